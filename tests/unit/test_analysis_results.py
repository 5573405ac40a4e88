"""An analysis job's results as its worker writes them (services.trainer_svc.analysis_job.Results):
records in input order go to pages, CSV, JSON and the manifest, whatever the number of tiles."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from pathlib import Path

import pytest

from services.trainer_svc import analysis_job
from services.trainer_svc.analysis_job import Results

PREFIX = "analyses/a-1/attempts/1/"
CLASSES = ["background", "cell"]


class MemoryStore:
    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put(self, key: str, data: bytes, content_type: str = "") -> None:
        self.objects[key] = data

    def put_file(self, key: str, path: Path, content_type: str = "") -> None:
        self.objects[key] = path.read_bytes()


def record(i: int, *, error: str = "") -> dict[str, object]:
    if error:
        return {"tile": f"t{i}", "image": f"uploads/u/t{i}.png", "mask": "", "width": 0, "height": 0,
                "classes": [], "error": error}
    return {"tile": f"t{i}", "image": f"uploads/u/t{i}.png", "mask": f"{PREFIX}masks/t{i}.png", "width": 4,
            "height": 4, "error": "", "classes": [
                {"index": 0, "name": "background", "pixels": 12, "fraction": 0.75, "objects": 1},
                {"index": 1, "name": "cell", "pixels": 4, "fraction": 0.25, "objects": i % 3}]}


def test_records_fill_pages_files_and_totals_in_input_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    monkeypatch.setattr(analysis_job, "PAGE", 4)
    store = MemoryStore()
    results = Results(store, PREFIX, header={"analysis": "analyses/a-1"}, class_names=CLASSES,  # type: ignore[arg-type]
                      folder=tmp_path)
    for i in range(10):
        results.add(record(i, error="image not found" if i == 7 else ""))
    output = results.finish()

    assert (output.tiles_analysed, output.tiles_failed) == (9, 1)
    pages = [json.loads(store.objects[p.uri]) for p in output.tile_pages]
    assert [len(p) for p in pages] == [4, 4, 2]
    assert [r["tile"] for page in pages for r in page] == [f"t{i}" for i in range(10)]
    cell = output.classes[1]
    assert (cell.pixel_count, cell.object_count, cell.tiles_present) == (36, sum(i % 3 for i in range(10) if i != 7), 9)
    assert cell.area_fraction == pytest.approx(36 / (9 * 16))
    rows = list(csv.DictReader(io.StringIO(store.objects[output.tiles_csv.uri].decode())))
    assert len(rows) == 9 * 2 + 1 and rows[-1]["tile"] == "t9"
    assert next(r for r in rows if r["tile"] == "t7")["error"] == "image not found"
    assert json.loads(store.objects[output.tiles_json.uri]) == [r for page in pages for r in page]
    manifest = json.loads(store.objects[output.manifest.uri])
    assert manifest["analysis"] == "analyses/a-1" and manifest["tiles_analysed"] == 9
    assert [t["tile"] for t in manifest["tiles"]] == [f"t{i}" for i in range(10)]
    assert manifest["pages"] == [p.uri for p in output.tile_pages]
    classes = json.loads(store.objects[output.classes_json.uri])
    assert classes[1]["object_count"] == cell.object_count
    for artifact in (output.manifest, output.tiles_csv, output.tiles_json, output.classes_csv, *output.tile_pages):
        assert artifact.uri.startswith(PREFIX)
        data = store.objects[artifact.uri]
        assert artifact.size_bytes == len(data) and artifact.sha256 == hashlib.sha256(data).hexdigest()
