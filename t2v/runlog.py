"""The run contract: what training writes, and what the job scripts, jobs/status.py and tools/report.py may rely on.

Two streams, both appended across requeues in OUTDIR:
  * train.log (and stdout, the Slurm log): lines for people. They keep the baseline's format
    (`step 000020 | loss 0.1234`, `saved OUTDIR/ckpt_000200.pt`) because users' scripts grep them;
  * metrics.jsonl: one JSON object per line for tools. A loss record per `log_every` steps, and an event record
    (`{"event": <one of EVENTS>, "step": N, ...}`) for each thing that happened. Readers use these, not the prose.

The only prose a program reads is what the bash job script must (it cannot parse JSON on every host): the MARKERS
below, rendered into templates/train.sbatch by jobs/render.py and matched by the submitit worker from here.
Exit codes are here too. This module imports no torch: the submitit worker and jobs/status.py load it.
Only rank 0 writes; other ranks get a RunLog that stays silent.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Iterable

# --- exit codes ------------------------------------------------------------------------------------------------
REQUEUE_EXIT = 75  # training saved a checkpoint and stopped: please requeue (EX_TEMPFAIL)
USAGE_EXIT = 2  # a configuration or data error: fix it, resubmit; requeueing cannot help
NO_SPACE_EXIT = 74  # a write found no room (full disk, quota): free space, resubmit; a requeue would meet it again


class TrainingError(RuntimeError):
    """A run that cannot start or go on as asked (settings, data, caches, checkpoints): USAGE_EXIT and this message."""
CAP_EXIT = 3  # the job script: restart cap reached, not training / not requeueing

# --- metrics.jsonl events --------------------------------------------------------------------------------------
START, RESUME, CHECKPOINT, VAL, PREVIEW_FAILED, PREEMPT, DONE, ERROR = (
    "start", "resume", "checkpoint", "val", "preview_failed", "preempt", "done", "error")
EVENTS = (START, RESUME, CHECKPOINT, VAL, PREVIEW_FAILED, PREEMPT, DONE, ERROR)

# --- marker lines the job scripts recognise in train.log --------------------------------------------------------
OUT_PREFIX = "Out: "  # the first line: signal handlers are installed from here on
RESUMED_PREFIX = "resumed from "
STEP_PREFIX = "step "
READY_PREFIXES = (OUT_PREFIX, STEP_PREFIX, RESUMED_PREFIX)  # any of them: training listens for signals
REQUEUE_MARK = "saving and exiting for requeue"  # in the line logged when a signal stops training
DONE_PREFIX = "done: "  # the last line of a finished run


def _ere(text: str) -> str:
    """``text`` as a literal in a POSIX extended regular expression (grep -E)."""
    return "".join("\\" + c if c in ".[]()*+?{}|^$\\" else c for c in text)


MARKERS = {  # for `grep -E` in templates/train.sbatch
    "ready_re": "^(" + "|".join(_ere(p) for p in READY_PREFIXES) + ")",
    "done_re": "^" + _ere(DONE_PREFIX),
    "requeue_re": _ere(REQUEUE_MARK),
}


def is_ready_line(line: str) -> bool:
    return line.startswith(READY_PREFIXES)


def outcome(lines: Iterable[str]) -> str:
    """What a run's log lines say about how it stopped: "done", "requeue" (it saved to stop) or ""."""
    lines = list(lines)
    if any(line.startswith(DONE_PREFIX) for line in lines):
        return "done"
    return "requeue" if any(REQUEUE_MARK in line for line in lines) else ""


def preview_path(outdir: str | Path, step: int) -> Path:
    """Where the preview grid of ``step`` is saved (tools/reporting/inventory.py lists them by this name)."""
    return Path(outdir) / "samples" / f"preview_step{step:06d}.png"


def read_records(outdir: str | Path, skipped: list[tuple[int, bool]] | None = None) -> list[dict]:
    """Every record of OUTDIR/metrics.jsonl; a line that is not a JSON object (a write cut by a kill) is skipped.

    With ``skipped``, each skipped line that is not blank is appended to it as (1-based line number, cut): cut when
    it is the last line that is not blank and not JSON at all, which is what a kill mid-write leaves; any other
    skipped line is worth a word to the reader."""
    path = Path(outdir) / "metrics.jsonl"
    out = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    lines = text.splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        try:
            rec, cut = json.loads(line), False
        except ValueError:
            rec, cut = None, i == last
        if isinstance(rec, dict):
            out.append(rec)
        elif skipped is not None and line.strip():
            skipped.append((i + 1, cut))
    return out


def events(records: Iterable[dict], name: str | None = None) -> list[dict]:
    return [r for r in records if "event" in r and (name is None or r["event"] == name)]


def log_error(outdir: str | Path, msg: str, reason: str = "") -> None:
    """Append the error that stopped a run to its train.log and, as an ``error`` event with ``reason`` (e.g.
    "no_space"), to its metrics.jsonl (if the run folder exists), so the log, `make status` and the report say why
    the run ended, not only stderr. Best effort: on a full disk even these few bytes may not fit."""
    folder = Path(outdir)
    if not folder.is_dir():
        return
    step = max((r["step"] for r in read_records(folder) if isinstance(r.get("step"), int)), default=0)
    record = {"event": ERROR, "step": step, "reason": reason or "error", "error": msg, "time": round(time.time(), 3)}
    for path, line in ((folder / "train.log", f"error: {msg}"), (folder / "metrics.jsonl", json.dumps(record))):
        try:
            with _open_appending(path) as f:
                f.write(line + "\n")
        except OSError:
            pass


def _open_appending(path: Path):
    """``path`` opened to append lines. A process SIGKILLed mid-write leaves a cut last line: end it first, so the
    next process's first record (its `resume` event) is not glued to it and lost."""
    try:
        with open(path, "rb") as f:
            f.seek(-1, 2)
            cut = f.read(1) != b"\n"
    except OSError:  # missing or empty
        cut = False
    f = open(path, "a", buffering=1)
    if cut:
        f.write("\n")
    return f


class _Warnings(logging.Handler):
    """Warnings of the t2v modules (a quarantined checkpoint, skipped manifest lines or clips) into the run's
    log as well as stderr: train.log is what a user reads after the job, the Slurm log may be long gone."""

    def __init__(self, runlog: "RunLog"):
        super().__init__(logging.WARNING)
        self.runlog = runlog

    def emit(self, record: logging.LogRecord) -> None:
        if self.runlog._text.closed:
            return
        msg = record.getMessage()
        self.runlog.warn(msg[len("warning: "):] if msg.startswith("warning: ") else msg)


class RunLog:
    def __init__(self, outdir: str | Path, enabled: bool = True, restart: int = 0):
        self.outdir = Path(outdir)
        self.enabled = enabled
        self.restart = restart
        self._sinks: list = []
        if enabled:
            self.outdir.mkdir(parents=True, exist_ok=True)
            self._text = _open_appending(self.outdir / "train.log")
            self._metrics = _open_appending(self.outdir / "metrics.jsonl")
            self._warnings = _Warnings(self)
            logger = logging.getLogger("t2v")
            for stale in [h for h in logger.handlers if isinstance(h, _Warnings)]:  # a run that ended in an error
                logger.removeHandler(stale)
            logger.addHandler(self._warnings)

    def line(self, msg: str) -> None:
        if self.enabled:
            print(msg, flush=True)
            self._text.write(msg + "\n")

    def add_sink(self, sink) -> None:
        """A tracker (t2v.tracking) that receives every record metrics.jsonl receives, and the preview images."""
        if self.enabled:
            self._sinks.append(sink)

    def metrics(self, **record) -> None:
        if self.enabled:
            record.setdefault("time", time.time())
            record.setdefault("restart", self.restart)
            self._metrics.write(json.dumps(record) + "\n")
            for sink in self._sinks:
                sink.record(record)

    def image(self, tag: str, path: Path, step: int) -> None:
        for sink in self._sinks:  # empty unless enabled (add_sink)
            sink.image(tag, path, step)

    def event(self, name: str, step: int, **extra) -> None:
        self.metrics(event=name, step=step, **extra)

    def warn(self, msg: str) -> None:
        if self.enabled:
            print(f"warning: {msg}", file=sys.stderr, flush=True)
            self._text.write(f"warning: {msg}\n")

    def close(self) -> None:
        if self.enabled and not self._text.closed:
            logging.getLogger("t2v").removeHandler(self._warnings)
            self._text.close()
            self._metrics.close()
            for sink in self._sinks:
                sink.close()
            self._sinks.clear()
