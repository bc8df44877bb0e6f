"""``samples.jsonl``, the ledger of an evaluation run: durable appends, a clean reload."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ihgrpo.utils import fsync_dir

__all__ = ["LEDGER", "SampleLedger"]

LEDGER = "samples.jsonl"


class SampleLedger:
    """``samples.jsonl``: one JSON line per sample, keyed by (benchmark, problem, sample).

    Appends are whole batches of lines in one ``write`` followed by ``fsync``. Loading drops a
    partial last line (an append cut short), undecodable lines and duplicates, and rewrites the
    file without them (atomically), so that the next append starts on a clean line.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.records: dict[tuple[str, int, int], dict] = {}
        self.dropped = 0

    def load(self) -> "SampleLedger":
        self.records.clear()
        if not self.path.exists():
            return self
        data = self.path.read_bytes()
        kept: list[bytes] = []
        dropped = 0
        lines = data.split(b"\n")
        for raw in lines:
            if not raw.strip():
                continue
            try:
                rec = json.loads(raw)
                key = (str(rec["benchmark"]), int(rec["problem"]), int(rec["sample"]))
                rec["correct"], rec["text"]  # noqa: B018 - a complete record has these
            except (ValueError, KeyError, TypeError):
                dropped += 1
                continue
            if key in self.records:
                dropped += 1
                continue
            self.records[key] = rec
            kept.append(raw)
        self.dropped = dropped
        if dropped or (data and not data.endswith(b"\n")):
            tmp = self.path.with_name(self.path.name + ".tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(line + b"\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
        return self

    def append(self, records: list[dict]) -> None:
        if not records:
            return
        payload = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(payload)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        for r in records:
            self.records[(r["benchmark"], r["problem"], r["sample"])] = r

    def __contains__(self, key) -> bool:
        return key in self.records

    def for_benchmark(self, name: str) -> list[dict]:
        return [r for (b, _, _), r in self.records.items() if b == name]
