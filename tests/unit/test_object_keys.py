"""The object-store layout: the README shows the module's table, and attempts never share keys."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.common import object_keys
from services.common.errors import InvalidArgumentError

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_key_table() -> list[tuple[str, str, str]]:
    section = README.read_text().split("## Object keys", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [tuple(cell.strip() for cell in row.strip("|").split(" | ")) for row in rows]  # type: ignore[misc]


def test_the_readme_key_table_is_the_layout_module() -> None:
    assert readme_key_table() == [(f"`{key}`", writer, what) for key, writer, what in object_keys.LAYOUT]


def test_every_key_a_run_writes_carries_its_attempt() -> None:
    first, second = object_keys.attempt_prefix("j-1", 1), object_keys.attempt_prefix("j-1", 2)
    written = [lambda p: object_keys.state_checkpoint(p), lambda p: object_keys.model_weights(p, "best"),
               lambda p: object_keys.model_weights(p, "final")]
    for key in written:
        assert key(first) != key(second)
        assert key(first).startswith("jobs/j-1/attempts/1/") and key(second).startswith("jobs/j-1/attempts/2/")
    with pytest.raises(ValueError):
        object_keys.attempt_prefix("j-1", 0)


def test_keys_from_requests_must_lie_where_the_layout_puts_them() -> None:
    assert object_keys.check_upload_key("uploads/u/a.png", field="f") == "uploads/u/a.png"
    cases = [
        lambda: object_keys.check_upload_key("training-sets/x/a.png", field="tiles[0].image_key"),
        lambda: object_keys.check_attempt_prefix("jobs/j-1/attempts/2/", job_id="j-1", attempt=1,
                                                 field="output_prefix"),
        lambda: object_keys.check_attempt_prefix("jobs/j-2/attempts/1/", job_id="j-1", attempt=1,
                                                 field="output_prefix"),
        lambda: object_keys.check_job_key("jobs/j-2/attempts/1/checkpoints/state-latest.pt", job_id="j-1",
                                          field="resume_checkpoint_uri"),
        lambda: object_keys.check_model_key("jobs/j-1/attempts/1/checkpoints/state-latest.pt",
                                            field="from_model.weights_uri"),
        lambda: object_keys.check_analysis_prefix("analyses/a/b/", field="output_prefix"),
        lambda: object_keys.check_analysis_prefix("analyses/../x/", field="output_prefix"),
    ]
    for case in cases:
        with pytest.raises(InvalidArgumentError) as caught:
            case()
        assert caught.value.violations and caught.value.violations[0].field


def test_no_key_or_name_literal_stands_outside_its_owner() -> None:
    """Prefixes of the layout appear as string literals only in services/common/object_keys.py,
    and resource names such as "jobs/{id}" only in the names helpers (services/common/names.py,
    clients/names.py), in production code, benchmarks and scripts alike."""
    root = Path(__file__).resolve().parents[2]
    prefixes = "uploads|training-sets|jobs|analyses|pipelines|trainingSets|models|trainerNodes"
    pattern = re.compile(rf"""["']({prefixes})/[^"']*["']|f["']({prefixes})/""")
    offenders = []
    owners = ("services/common/object_keys.py", "services/common/names.py", "clients/names.py")
    folders = ("services", "clients", "bench", "scripts")
    for path in sorted(p for folder in folders for p in (root / folder).rglob("*.py")):
        if path.relative_to(root).as_posix() in owners:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) and not line.lstrip().startswith(("#", "log.")):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []
