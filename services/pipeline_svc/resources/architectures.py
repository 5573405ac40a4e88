"""The architecture catalogue: the training core's registry, as the pipeline service lists and
validates it."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class ArchitectureEntry:
    name: str
    description: str
    parameter_count: int


class Architectures:
    """The training core's registry, imported lazily: it pulls in torch and transformers (seconds),
    which the pipeline service needs only for listing and validating names."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[ArchitectureEntry] | None = None

    def warm_up(self) -> None:
        threading.Thread(target=self.entries, name="architectures-warm-up", daemon=True).start()

    def entries(self) -> list[ArchitectureEntry]:
        with self._lock:
            if self._entries is None:
                from segcore import architectures

                self._entries = [
                    ArchitectureEntry(a.name, a.description, a.parameter_count)
                    for a in architectures.list_architectures()
                ]
            return self._entries

    def names(self) -> list[str]:
        return [e.name for e in self.entries()]
