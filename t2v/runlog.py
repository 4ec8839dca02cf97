"""What a run writes for people and for tools/report.py: the text log and the JSON-lines metrics.

The text lines keep the baseline's format (`step 000020 | loss 0.1234`, `saved OUTDIR/ckpt_000200.pt`) because
users' scripts grep for them. They go to stdout (the Slurm log) and are appended to OUTDIR/train.log, which
survives requeues. Only rank 0 writes; other ranks get a RunLog that stays silent.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class RunLog:
    def __init__(self, outdir: str | Path, enabled: bool = True, restart: int = 0):
        self.outdir = Path(outdir)
        self.enabled = enabled
        self.restart = restart
        if enabled:
            self.outdir.mkdir(parents=True, exist_ok=True)
            self._text = open(self.outdir / "train.log", "a", buffering=1)
            self._metrics = open(self.outdir / "metrics.jsonl", "a", buffering=1)

    def line(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)
            self._text.write(msg + "\n")

    def metrics(self, **record) -> None:
        if self.enabled:
            record.setdefault("time", time.time())
            record.setdefault("restart", self.restart)
            self._metrics.write(json.dumps(record) + "\n")

    def event(self, name: str, step: int, **extra) -> None:
        self.metrics(event=name, step=step, **extra)

    def warn(self, msg: str) -> None:
        if self.enabled:
            print(f"warning: {msg}", file=sys.stderr, flush=True)
            self._text.write(f"warning: {msg}\n")

    def close(self) -> None:
        if self.enabled:
            self._text.close()
            self._metrics.close()
