"""What a run folder's logs say: loss records and events as data frames, plus config.yaml.

metrics.jsonl is the source of a run's facts (t2v/runlog.py is the contract: loss records, and events for
start, resume, checkpoint, val, preview_failed, preempt, done); it is read once, through t2v.runlog.read_records.
The text logs (train.log, slurm-*.out) are parsed only for what metrics.jsonl does not cover: runs from before
metrics.jsonl existed (the baseline wrote only `step 000020 | loss 0.1234` and `saved OUTDIR/ckpt_000200.pt`),
and the start of a run that newer code resumed. That prose parser keeps the baseline's formats working exactly.
Of the extra fields after the loss it reads only `| lr X`, `| grad_norm X` and `| N clips/s`, which the report
has always accepted and tests/test_report.py pins; spellings that no version of training wrote (gnorm,
learning_rate, it/s, s/it, ...) are not guessed at.

Both streams are cut into process segments (one per start of the training process), which the plots draw as
separate lines and the statistics use for wall time: a replayed range of steps after a resume from an older
checkpoint is a second segment, not a zigzag.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pandas as pd

from t2v import runlog

LOSS_COLUMNS = ["step", "loss", "lr", "grad_norm", "clips_per_s", "step_time", "time", "restart", "source",
                "segment", "repeat"]
EVENT_COLUMNS = ["event", "step", "time", "restart", "path", "segment", "source"]

_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
# The text log's lines that matter, wherever a logging prefix puts them on the line (`2024-05-01 ... INFO step`).
STEP_RE = re.compile(rf"\bstep\s+(?P<step>\d+)\s*\|\s*loss\s+(?P<loss>{_FLOAT})(?![\w.])(?P<rest>.*)$", re.I)
FIELD_RE = re.compile(rf"\|\s*(?:(?P<key>lr|grad_norm)\s+(?P<val>{_FLOAT})|(?P<clips>{_FLOAT})\s*clips/s)", re.I)
OUT_RE = re.compile(rf"\b{re.escape(runlog.OUT_PREFIX.strip())}\s*(?P<out>.*?)\s*\|\s*Device:\s*(?P<device>\S+)")
RESUME_RE = re.compile(rf"\b{re.escape(runlog.RESUMED_PREFIX)}(?P<path>\S+?) at step (?P<step>\d+)"
                       r"(?:\s*\(restart (?P<restart>\d+)\))?")
SAVED_RE = re.compile(r"\bsaved (?P<path>\S*ckpt_(?P<step>\d+)(?:\.pt)?)(?![\w.])")  # a file, or a sharded folder
SIGNAL_RE = re.compile(r"\bsignal (?P<sig>\S+) at step (?P<step>\d+)")  # SIGUSR1, SIGTERM, stop_at


def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _log_fields(rest: str) -> dict[str, float]:
    """The optional `| lr 1.0e-04 | grad_norm 0.5 | 3.1 clips/s` fields after the loss (the first of each wins)."""
    out: dict[str, float] = {}
    for m in FIELD_RE.finditer(rest):
        name, val = (m.group("key").lower(), m.group("val")) if m.group("key") else ("clips_per_s", m.group("clips"))
        out.setdefault(name, float(val))
    return out


class _Segmenter:
    """Splits a chronological stream into process segments (one per start of the training process).

    A new segment begins at a start marker, at a resume marker that follows step records, when the restart
    counter changes, or when the step goes backwards without any marker (an unannounced restart)."""

    def __init__(self) -> None:
        self.seg, self.used, self.has_steps, self.prev_step, self.restart = 0, False, False, None, None

    def _new(self) -> None:
        if self.used:
            self.seg += 1
        self.used, self.has_steps, self.prev_step = False, False, None

    def start(self) -> int:
        self._new()
        self.used = True
        return self.seg

    def resume(self, restart: int | None) -> int:
        if self.has_steps:
            self._new()
        self.used = True
        if restart is not None:
            self.restart = restart
        return self.seg

    def step(self, step: int, restart: int | None = None) -> int:
        if (self.prev_step is not None and step <= self.prev_step) or (
                restart is not None and self.restart is not None and restart != self.restart and self.has_steps):
            self._new()
        if restart is not None:
            self.restart = restart
        self.used, self.has_steps, self.prev_step = True, True, step
        return self.seg

    def other(self) -> int:
        self.used = True
        return self.seg


def _frame(rows: list[dict], columns: list[str]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for c in ("step", "restart", "segment", "repeat"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce")
            if df[c].notna().all():
                df[c] = df[c].astype("int64")
    for c in ("loss", "lr", "grad_norm", "clips_per_s", "step_time", "time"):
        if c in df:
            df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    return df


def add_repeats(losses: pd.DataFrame) -> pd.DataFrame:
    """`repeat` = how many times this step was logged before (0 = first time), in chronological order."""
    losses = losses.reset_index(drop=True)
    losses["repeat"] = losses.groupby("step").cumcount().astype("int64") if len(losses) else pd.Series(dtype="int64")
    return losses


def empty_frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    """(losses, events) with their columns and no rows."""
    return add_repeats(_frame([], LOSS_COLUMNS)), _frame([], EVENT_COLUMNS)


# ------------------------------------------------------------------------------------ the text log (fallback)
def scan_log(lines: Iterable[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Parse text-log lines into (losses, events). Lines that match nothing are ignored."""
    seg = _Segmenter()
    steps: list[dict] = []
    events: list[dict] = []
    restart, resumes = 0, 0
    for raw in lines:
        line = raw if isinstance(raw, str) else bytes(raw).decode("utf-8", "replace")
        if m := STEP_RE.search(line):
            step = int(m.group("step"))
            row = {"step": step, "loss": float(m.group("loss")), "time": math.nan, "restart": restart,
                   "source": "log", "segment": seg.step(step)}
            row.update(_log_fields(m.group("rest")))
            steps.append(row)
        elif m := RESUME_RE.search(line):
            resumes += 1  # logs older than the `(restart k)` suffix: count the resumes instead
            restart = int(m.group("restart")) if m.group("restart") else resumes
            events.append({"event": runlog.RESUME, "step": int(m.group("step")), "restart": restart,
                           "path": m.group("path"), "segment": seg.resume(restart)})
        elif m := OUT_RE.search(line):
            events.append({"event": runlog.START, "step": math.nan, "restart": math.nan, "path": m.group("out"),
                           "segment": seg.start()})
        elif m := SAVED_RE.search(line):
            events.append({"event": runlog.CHECKPOINT, "step": int(m.group("step")), "restart": restart,
                           "path": m.group("path"), "segment": seg.other()})
        elif m := SIGNAL_RE.search(line):
            events.append({"event": runlog.PREEMPT, "step": int(m.group("step")), "restart": restart,
                           "path": m.group("sig"), "segment": seg.other()})
    for e in events:
        e.update(time=math.nan, source="log")
    return add_repeats(_frame(steps, LOSS_COLUMNS)), _frame(events, EVENT_COLUMNS)


def parse_log(lines: Iterable[str]) -> pd.DataFrame:
    """Loss records of a text log: columns LOSS_COLUMNS (time is NaN: the log has no timestamps)."""
    return scan_log(lines)[0]


def _log_files(run_dir: Path) -> list[list[Path]]:
    """Candidate text logs: train.log, and the Slurm logs (one per job, by job id) taken together."""
    cands = []
    if (run_dir / "train.log").is_file():
        cands.append([run_dir / "train.log"])

    def key(p: Path):
        m = re.search(r"(\d+)", p.name)
        return (int(m.group(1)) if m else 0, p.name)
    slurm = sorted((p for p in run_dir.glob("slurm-*.out") if p.is_file()), key=key)
    if slurm:
        cands.append(slurm)
    return cands


def read_logs(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """train.log and the Slurm logs hold the same lines: use the one with the most step lines (train.log
    on a tie) instead of adding them up, which would double every step."""
    best = (*empty_frames(), [])
    for files in _log_files(run_dir):
        lines = [line for f in files for line in f.read_text(encoding="utf-8", errors="replace").splitlines()]
        steps, events = scan_log(lines)
        if len(steps) > len(best[0]) or (not best[2] and len(events)):
            best = (steps, events, files)
    return best


# ----------------------------------------------------------------------------------------- metrics.jsonl
def metrics_frames(records: Iterable[dict], skipped: Iterable[tuple[int, bool]] = (),
                   notes: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """t2v.runlog records -> (step records, event records). ``skipped`` is what read_records left out: a cut
    last line is normal when a job is killed mid-write; messages go to ``notes`` if given."""
    notes = notes if notes is not None else []
    skipped = list(skipped)
    seg = _Segmenter()
    steps: list[dict] = []
    events: list[dict] = []
    bad = sum(1 for _, cut in skipped if not cut)
    for rec in records:
        restart = rec.get("restart")
        restart = int(restart) if isinstance(restart, (int, float)) and not isinstance(restart, bool) else None
        if "event" in rec:
            kind = str(rec["event"])
            s = seg.start() if kind == runlog.START else seg.resume(restart) if kind == runlog.RESUME else seg.other()
            events.append({"event": kind, "step": rec.get("step"), "time": rec.get("time"), "restart": restart,
                           "path": rec.get("path"), "segment": s, "source": "metrics"})
        elif "step" in rec and "loss" in rec:
            if not math.isfinite(_num(rec["step"])):
                bad += 1
                continue
            row = {k: _num(rec.get(k)) for k in ("loss", "lr", "grad_norm", "clips_per_s", "step_time", "time")}
            step = int(_num(rec["step"]))
            row.update(step=step, restart=restart if restart is not None else seg.restart or 0,
                       source="metrics", segment=seg.step(step, restart))
            if "world_size" in rec:
                row["world_size"] = _num(rec["world_size"])
            steps.append(row)
    if any(cut for _, cut in skipped):
        notes.append("metrics.jsonl: last line is truncated (job killed mid-write), ignored")
    if bad:
        notes.append(f"metrics.jsonl: {bad} unreadable line(s) skipped")
    cols = LOSS_COLUMNS + (["world_size"] if any("world_size" in r for r in steps) else [])
    return add_repeats(_frame(steps, cols)), _frame(events, EVENT_COLUMNS)


def read_metrics(path: str | os.PathLike, notes: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """OUTDIR/metrics.jsonl (or OUTDIR) -> (step records, event records), read with t2v.runlog.read_records."""
    path = Path(path)
    skipped: list[tuple[int, bool]] = []
    records = runlog.read_records(path.parent if path.name == "metrics.jsonl" else path, skipped)
    return metrics_frames(records, skipped, notes)


def val_frame(records: Iterable[dict]) -> pd.DataFrame:
    """The validation-loss events, one row per step (the later record when a step was measured again after a
    resume from an older checkpoint), columns step, val_loss, val_loss_t<T>... in timestep order."""
    rows = [{k: (v if k == "step" else _num(v)) for k, v in rec.items() if k == "step" or k.startswith("val_loss")}
            for rec in runlog.events(records, runlog.VAL) if isinstance(rec.get("step"), int)]
    if not rows:
        return pd.DataFrame(columns=["step", "val_loss"])
    df = pd.DataFrame(rows).drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    per_t = sorted((c for c in df.columns if c.startswith("val_loss_t")), key=lambda c: int(c[len("val_loss_t"):]))
    return df[["step", "val_loss", *per_t]].reset_index(drop=True)


def merge_losses(met: pd.DataFrame, log: pd.DataFrame) -> pd.DataFrame:
    """metrics.jsonl wins. Log records from before metrics.jsonl began (a run started by older code, then
    resumed by code that writes metrics) are put in front."""
    if met.empty:
        return log
    if log.empty:
        return met
    first = met.iloc[0]
    hit = log.index[(log["step"] == first["step"]) & (log["restart"] == first["restart"])]
    prefix = log.loc[: hit[0] - 1] if len(hit) else log[log["step"] < first["step"]]
    if prefix.empty:
        return met
    met = met.copy()
    met["segment"] += int(log.loc[hit[0], "segment"]) if len(hit) else int(prefix["segment"].max()) + 1
    out = pd.concat([prefix.drop(columns="repeat"), met.drop(columns="repeat")], ignore_index=True)
    return add_repeats(out)[[c for c in met.columns]]


def resumes(*events: pd.DataFrame) -> pd.DataFrame:
    """Resume events, in order. Callers pass each resume from one source only (metrics.jsonl or the log),
    so nothing is deduplicated here: two resumes from the same checkpoint are two restarts."""
    cols = ["restart", "step", "path", "time", "segment", "source"]
    parts = [r for r in (e[e["event"] == runlog.RESUME] for e in events) if len(r)]  # empty frames carry no dtype
    if not parts:
        return _frame([], cols)
    return pd.concat(parts, ignore_index=True)[cols].sort_values("segment", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------- config.yaml
def read_config(path: Path, notes: list[str]) -> dict | None:
    """The config.yaml training saved (yaml.safe_load: a config is data, never code), or None."""
    if not path.is_file():
        return None
    try:
        import yaml
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        return cfg if isinstance(cfg, dict) else None
    except Exception as e:  # a broken config must not stop the report
        notes.append(f"config.yaml: unreadable ({type(e).__name__})")
        return None


# Two losses logged for the same step (before and after a resume) "agree" within this tolerance. The text
# log prints 4 decimals, so the absolute part covers rounding; the relative part covers GPU nondeterminism.
AGREE_RTOL, AGREE_ATOL = 1e-3, 1e-4


def find_duplicates(losses: pd.DataFrame) -> pd.DataFrame:
    """Steps logged more than once (after a resume from an older checkpoint): both losses and whether they
    agree (within AGREE_RTOL/AGREE_ATOL). One row per repeat, compared with the first time the step was logged."""
    cols = ["step", "repeat", "loss_first", "loss_again", "diff", "agree", "segment_first", "segment_again"]
    if losses.empty or not (losses["repeat"] > 0).any():
        return pd.DataFrame(columns=cols)
    first = losses[losses["repeat"] == 0].drop_duplicates("step").set_index("step")
    again = losses[losses["repeat"] > 0]
    out = pd.DataFrame({
        "step": again["step"].to_numpy(),
        "repeat": again["repeat"].to_numpy(),
        "loss_first": first.loc[again["step"], "loss"].to_numpy(),
        "loss_again": again["loss"].to_numpy(),
        "segment_first": first.loc[again["step"], "segment"].to_numpy(),
        "segment_again": again["segment"].to_numpy(),
    })
    out["diff"] = out["loss_again"] - out["loss_first"]
    out["agree"] = np.isclose(out["loss_again"], out["loss_first"], rtol=AGREE_RTOL, atol=AGREE_ATOL,
                              equal_nan=True)
    return out[cols].reset_index(drop=True)
