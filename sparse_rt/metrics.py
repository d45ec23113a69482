"""Per-message metrics: one JSON line per message, with its kind, bytes and time in each stage."""
from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class StageTimer:
    """Collects milliseconds per named stage of one message."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.ms[name] = self.ms.get(name, 0.0) + (time.perf_counter() - started) * 1e3


class MetricsLog:
    """Appends records to a JSONL file; a disabled log (no path) costs nothing."""

    def __init__(self, path: Path | None) -> None:
        self._file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "a", buffering=1, encoding="utf-8")

    @property
    def enabled(self) -> bool:
        return self._file is not None

    def record(self, timer: StageTimer | None = None, **fields: Any) -> None:
        if self._file is None:
            return
        record = {"time": round(time.time(), 6), **fields}
        if timer is not None:
            record["ms"] = {name: round(value, 3) for name, value in timer.ms.items()}
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
