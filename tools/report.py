"""Training report for one or more run folders: loss curves, throughput, checkpoint inventory, summary.

    python tools/report.py RUN_DIR [RUN_DIR ...] [--log-scale] [--smooth N] [--out DIR] [--no-load]
    make report RUN=runs/x

What it reads (the contract with training; everything else in the folder is ignored):
  train.log / slurm-*.out   the text log (baseline format `step 000020 | loss 0.1234`, extra `| key value`
                            fields tolerated; junk lines ignored), plus `Out: ... | Device: ...`,
                            `resumed from ... at step N (restart k)`, `saved .../ckpt_N.pt`, `signal SIG.. at step N`
  metrics.jsonl             step records and {"event": ...} records; blank lines and a truncated last line tolerated
                            ({"event": "val", "val_loss_t100": ...}: the validation loss at fixed timesteps)
  ckpt_*.pt, ckpt_*.pt.corrupt, samples/preview_step*.png, eval/step_*.json, eval/demo_check.json, config.yaml

What it writes: RUN_DIR/report/ only (loss.png, throughput.png, val.png, eval.png, checkpoints.csv,
checkpoints.md, summary.md). With several runs it also writes loss_overlay.png and compare.md into --out (default: the
first run's report folder). It never renames, deletes or rewrites anything else in a run folder: in
particular it does not call t2v.checkpoint.load_latest (which quarantines broken checkpoints).

The log/metrics part needs only pandas + matplotlib; torch is imported lazily by the checkpoint inventory,
so the report also works on a login node without torch (checkpoints are then listed as "not checked").
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd

LOSS_COLUMNS = ["step", "loss", "lr", "grad_norm", "clips_per_s", "step_time", "time", "restart", "source",
                "segment", "repeat"]
EVENT_COLUMNS = ["event", "step", "time", "restart", "path", "segment", "source"]
INVENTORY_COLUMNS = ["file", "step", "time_written", "time_source", "size_mb", "loss_step", "loss_near",
                     "has_ema", "has_optimizer", "status", "resume_pick"]
# Two losses logged for the same step (before and after a resume) "agree" within this tolerance. The text
# log prints 4 decimals, so the absolute part covers rounding; the relative part covers GPU nondeterminism.
AGREE_RTOL, AGREE_ATOL = 1e-3, 1e-4

_FLOAT = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?(?:nan|inf(?:inity)?)"
STEP_RE = re.compile(rf"\bstep\s+(?P<step>\d+)\s*\|\s*loss\s+(?P<loss>{_FLOAT})(?![\w.])(?P<rest>.*)$", re.I)
FIELD_RE = re.compile(rf"\|\s*(?:(?P<key>[A-Za-z_][\w/]*)[\s:=]+(?P<val>{_FLOAT})(?P<unit>s\b)?"
                      rf"|(?P<val2>{_FLOAT})\s*(?P<unit2>clips/s|s/step|s/it|it/s))", re.I)
OUT_RE = re.compile(r"\bOut:\s*(?P<out>.*?)\s*\|\s*Device:\s*(?P<device>\S+)")
RESUME_RE = re.compile(r"\bresumed from (?P<path>\S+?) at step (?P<step>\d+)(?:\s*\(restart (?P<restart>\d+)\))?")
SAVED_RE = re.compile(r"\bsaved (?P<path>\S*ckpt_(?P<step>\d+)\.pt)\b")
SIGNAL_RE = re.compile(r"\bsignal (?P<sig>\S+) at step (?P<step>\d+)")  # SIGUSR1, SIGTERM, stop_at
CKPT_FILE_RE = re.compile(r"^ckpt_(?P<step>\d+)\.pt(?P<corrupt>\.corrupt)?$")
SAMPLE_RE = re.compile(r"^preview_step(?P<step>\d+)\.png$")
EVAL_RE = re.compile(r"^step_(?P<step>\d+)\.json$")
# Names the extra `| key value` fields of a log line may use, mapped onto the metrics.jsonl names.
FIELD_ALIASES = {"lr": "lr", "learning_rate": "lr", "grad_norm": "grad_norm", "gnorm": "grad_norm",
                 "grad": "grad_norm", "clips_per_s": "clips_per_s", "clips/s": "clips_per_s",
                 "step_time": "step_time", "time/step": "step_time", "s/step": "step_time", "s/it": "step_time"}


# ----------------------------------------------------------------------------------------------- parsing
def _num(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def _log_fields(rest: str) -> dict[str, float]:
    """The optional `| lr 1.0e-04 | 3.1 clips/s | grad_norm 0.5` fields after the loss."""
    out: dict[str, float] = {}
    for m in FIELD_RE.finditer(rest):
        if m.group("key"):
            name = FIELD_ALIASES.get(m.group("key").lower())
            val = m.group("val")
        else:
            name = FIELD_ALIASES.get(m.group("unit2").lower())
            val = m.group("val2")
            if m.group("unit2").lower() == "it/s":
                name, val = "step_time", 1.0 / float(val) if float(val) else math.nan
        if name and name not in out:
            out[name] = float(val)
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
            resumes += 1
            restart = int(m.group("restart")) if m.group("restart") else resumes
            events.append({"event": "resume", "step": int(m.group("step")), "restart": restart,
                           "path": m.group("path"), "segment": seg.resume(restart)})
        elif m := OUT_RE.search(line):
            events.append({"event": "start", "step": math.nan, "restart": math.nan, "path": m.group("out"),
                           "segment": seg.start()})
        elif m := SAVED_RE.search(line):
            events.append({"event": "checkpoint", "step": int(m.group("step")), "restart": restart,
                           "path": m.group("path"), "segment": seg.other()})
        elif m := SIGNAL_RE.search(line):
            events.append({"event": "preempt", "step": int(m.group("step")), "restart": restart,
                           "path": m.group("sig"), "segment": seg.other()})
    for e in events:
        e.update(time=math.nan, source="log")
    return add_repeats(_frame(steps, LOSS_COLUMNS)), _frame(events, EVENT_COLUMNS)


def parse_log(lines: Iterable[str]) -> pd.DataFrame:
    """Loss records of a text log: columns LOSS_COLUMNS (time is NaN: the log has no timestamps)."""
    return scan_log(lines)[0]


def read_metrics(path: str | os.PathLike, notes: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """metrics.jsonl -> (step records, event records). Blank lines and undecodable lines are skipped (a
    truncated last line is normal when a job is killed mid-write); messages go to `notes` if given."""
    notes = notes if notes is not None else []
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    lines = text.splitlines()
    last = max((i for i, s in enumerate(lines) if s.strip()), default=-1)
    seg = _Segmenter()
    steps: list[dict] = []
    events: list[dict] = []
    bad = 0
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            if i == last:
                notes.append(f"{Path(path).name}: last line is truncated (job killed mid-write), ignored")
            else:
                bad += 1
            continue
        if not isinstance(rec, dict):
            bad += 1
            continue
        restart = rec.get("restart")
        restart = int(restart) if isinstance(restart, (int, float)) and not isinstance(restart, bool) else None
        if "event" in rec:
            kind = str(rec["event"])
            s = seg.start() if kind == "start" else seg.resume(restart) if kind == "resume" else seg.other()
            events.append({"event": kind, "step": rec.get("step"), "time": rec.get("time"), "restart": restart,
                           "path": rec.get("path"), "segment": s, "source": "metrics"})
        elif "step" in rec and "loss" in rec:
            step = int(_num(rec["step"])) if math.isfinite(_num(rec["step"])) else None
            if step is None:
                bad += 1
                continue
            row = {k: _num(rec.get(k)) for k in ("loss", "lr", "grad_norm", "clips_per_s", "step_time", "time")}
            row.update(step=step, restart=restart if restart is not None else seg.restart or 0,
                       source="metrics", segment=seg.step(step, restart))
            if "world_size" in rec:
                row["world_size"] = _num(rec["world_size"])
            steps.append(row)
    if bad:
        notes.append(f"{Path(path).name}: {bad} unreadable line(s) skipped")
    cols = LOSS_COLUMNS + (["world_size"] if any("world_size" in r for r in steps) else [])
    return add_repeats(_frame(steps, cols)), _frame(events, EVENT_COLUMNS)


def read_val_empty() -> pd.DataFrame:
    return pd.DataFrame(columns=["step", "val_loss"])


def read_val(path: str | os.PathLike) -> pd.DataFrame:
    """The validation-loss records of metrics.jsonl, one row per step (the later record when a step was
    measured again after a resume from an older checkpoint), columns step, val_loss, val_loss_t<T>..."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # read_metrics already notes unreadable lines
        if isinstance(rec, dict) and rec.get("event") == "val" and isinstance(rec.get("step"), int):
            rows.append({k: (v if k == "step" else _num(v)) for k, v in rec.items()
                         if k == "step" or k.startswith("val_loss")})
    if not rows:
        return read_val_empty()
    df = pd.DataFrame(rows).drop_duplicates("step", keep="last").sort_values("step", kind="stable")
    per_t = sorted((c for c in df.columns if c.startswith("val_loss_t")), key=lambda c: int(c[len("val_loss_t"):]))
    return df[["step", "val_loss", *per_t]].reset_index(drop=True)


def read_demo_check(run_dir: Path, notes: list[str]) -> dict | None:
    p = run_dir / "eval" / "demo_check.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        notes.append(f"eval/demo_check.json: unreadable ({e})")
        return None


# --------------------------------------------------------------------------------------------- the run
@dataclass
class Run:
    path: Path
    name: str
    losses: pd.DataFrame  # LOSS_COLUMNS, chronological (as logged), repeats kept
    events: pd.DataFrame  # EVENT_COLUMNS: start/resume/checkpoint/preempt/done
    resumes: pd.DataFrame  # restart, step, path, time, segment, source: one row per resume
    evals: pd.DataFrame  # one row per eval/step_*.json
    val: pd.DataFrame = field(default_factory=pd.DataFrame)  # step, val_loss, val_loss_t<T>: one row per step
    demo_check: dict | None = None  # eval/demo_check.json (tools/demo_check.py)
    samples: list[Path] = field(default_factory=list)  # preview grids, oldest step first
    config: dict | None = None
    sources: list[str] = field(default_factory=list)  # what was read, for the summary
    notes: list[str] = field(default_factory=list)

    @property
    def duplicates(self) -> pd.DataFrame:
        return find_duplicates(self.losses)

    @property
    def latest_sample(self) -> Path | None:
        return self.samples[-1] if self.samples else None


def _read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


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


def _read_logs(run_dir: Path) -> tuple[pd.DataFrame, pd.DataFrame, list[Path]]:
    """train.log and the Slurm logs hold the same lines: use the one with the most step lines (train.log
    on a tie) instead of adding them up, which would double every step."""
    best = (parse_log([]), scan_log([])[1], [])
    for files in _log_files(run_dir):
        lines = [line for f in files for line in _read_lines(f)]
        steps, events = scan_log(lines)
        if len(steps) > len(best[0]) or (not best[2] and len(events)):
            best = (steps, events, files)
    return best


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


def _resumes(*events: pd.DataFrame) -> pd.DataFrame:
    """Resume markers, in order. Callers pass each resume from one source only (metrics.jsonl or the log),
    so nothing is deduplicated here: two resumes from the same checkpoint are two restarts."""
    r = pd.concat([e[e["event"] == "resume"] for e in events], ignore_index=True)
    return r[["restart", "step", "path", "time", "segment", "source"]].sort_values("segment", kind="stable") \
        .reset_index(drop=True)


def read_evals(run_dir: Path, notes: list[str] | None = None) -> pd.DataFrame:
    rows = []
    for p in sorted((run_dir / "eval").glob("step_*.json")):
        m = EVAL_RE.match(p.name)
        if not m:
            continue
        try:
            rec = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(rec, dict):
                raise ValueError("not an object")
        except (ValueError, OSError) as e:
            if notes is not None:
                notes.append(f"eval/{p.name}: unreadable ({e})")
            continue
        rec = {k: v for k, v in rec.items() if isinstance(v, (int, float, str, bool)) or v is None}
        rec.setdefault("step", int(m.group("step")))
        rec["file"] = f"eval/{p.name}"
        rows.append(rec)
    if not rows:
        return pd.DataFrame(columns=["step", "file"])
    df = pd.DataFrame(rows)
    df["step"] = pd.to_numeric(df["step"], errors="coerce")
    return df.sort_values("step", kind="stable").reset_index(drop=True)


def _read_config(path: Path, notes: list[str]) -> dict | None:
    if not path.is_file():
        return None
    try:
        import yaml
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        return cfg if isinstance(cfg, dict) else None
    except Exception as e:  # a broken config must not stop the report
        notes.append(f"config.yaml: unreadable ({type(e).__name__})")
        return None


def load_run(run_dir: str | os.PathLike) -> Run:
    """Everything the report needs from a run folder, without torch. Reads only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    notes: list[str] = []
    sources: list[str] = []
    log_steps, log_events, log_files = _read_logs(run_dir)
    met_steps, met_events = scan_log([])
    mpath = run_dir / "metrics.jsonl"
    if mpath.is_file():
        met_steps, met_events = read_metrics(mpath, notes)
        sources.append(f"metrics.jsonl ({len(met_steps)} step records, {len(met_events)} events)")
    if log_files:
        names = ", ".join(p.name for p in log_files)
        sources.append(f"{names} ({len(log_steps)} step lines)")
    losses = merge_losses(met_steps, log_steps)
    offset = 0
    if len(met_steps) and (losses["source"] == "metrics").any():
        # log records put in front of the metrics shift its segment numbers; keep its events in step
        offset = int(losses.loc[losses["source"] == "metrics", "segment"].iloc[0]) - int(met_steps["segment"].iloc[0])
        met_events = met_events.assign(segment=met_events["segment"] + offset)
    # resumes: from metrics.jsonl when there is one; from the log only for the part before metrics.jsonl began
    resumes = _resumes(log_events[log_events["segment"] < offset], met_events) if len(met_steps) or len(met_events) \
        else _resumes(log_events)
    events = pd.concat([e for e in (met_events, log_events) if len(e)], ignore_index=True) \
        if len(met_events) or len(log_events) else met_events
    samples = sorted(((int(m.group("step")), p) for p in (run_dir / "samples").glob("preview_step*.png")
                      if (m := SAMPLE_RE.match(p.name))), key=lambda t: t[0])
    return Run(path=run_dir, name=run_dir.resolve().name, losses=losses, events=events,
               resumes=resumes, evals=read_evals(run_dir, notes), samples=[p for _, p in samples],
               val=read_val(mpath) if mpath.is_file() else read_val_empty(),
               demo_check=read_demo_check(run_dir, notes),
               config=_read_config(run_dir / "config.yaml", notes), sources=sources, notes=notes)


# ------------------------------------------------------------------------------------------ derived data
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


def effective(losses: pd.DataFrame) -> pd.DataFrame:
    """The history the final model actually followed: for a step logged twice, the later record."""
    if losses.empty:
        return losses
    return losses.drop_duplicates("step", keep="last").sort_values("step", kind="stable").reset_index(drop=True)


def auto_smooth(n_points: int) -> int:
    """Default EMA span: about 5% of the logged points, between 5 and 100."""
    return int(min(100, max(5, round(n_points / 20))))


def smooth(values: pd.Series, span: int) -> pd.Series:
    """Exponential moving average over `span` logged points (span <= 1: unchanged)."""
    values = pd.Series(values, dtype="float64").reset_index(drop=True)
    if span <= 1:
        return values
    return values.ewm(span=span, adjust=True, ignore_na=True).mean()


def segment_times(run: Run) -> pd.DataFrame:
    """Per process segment: first and last timestamp seen (step records and events) and the elapsed time."""
    parts = [df[["segment", "time"]] for df in (run.losses, run.events) if len(df) and "time" in df]
    if not parts:
        return pd.DataFrame(columns=["segment", "start", "end", "elapsed"])
    t = pd.concat(parts, ignore_index=True).dropna()
    if t.empty:
        return pd.DataFrame(columns=["segment", "start", "end", "elapsed"])
    g = t.groupby("segment")["time"].agg(start="min", end="max").reset_index()
    g["elapsed"] = g["end"] - g["start"]
    return g


def restart_table(run: Run) -> pd.DataFrame:
    """One row per resume: the step and checkpoint it resumed from, when, and how many steps it redid."""
    L, rows = run.losses, []
    for _, r in run.resumes.iterrows():
        before = L.loc[L["segment"] < r["segment"], "step"] if len(L) else L["step"]
        t = r["time"]
        rows.append({"restart": int(r["restart"]) if pd.notna(r["restart"]) else None,
                     "resumed at step": int(r["step"]),
                     "from": Path(str(r["path"])).name if isinstance(r["path"], str) else None,
                     "time": _dt.datetime.fromtimestamp(t).isoformat(timespec="seconds") if pd.notna(t) else None,
                     "steps redone": max(0, int(before.max()) - int(r["step"])) if len(before) else 0})
    return pd.DataFrame(rows, columns=["restart", "resumed at step", "from", "time", "steps redone"])


def stats(run: Run, smooth_span: int = 0) -> dict[str, Any]:
    """The numbers of the summary (NaN / None where the data are not there)."""
    L, eff = run.losses, effective(run.losses)
    span = smooth_span or auto_smooth(len(eff))
    out: dict[str, Any] = {"records": len(L), "smooth_span": span}
    out["last_step"] = int(L["step"].max()) if len(L) else None
    finite = L[np.isfinite(L["loss"])] if len(L) else L
    if len(finite):
        b = finite.loc[finite["loss"].idxmin()]
        out.update(best_loss=float(b["loss"]), best_step=int(b["step"]))
        out.update(last_loss=float(eff["loss"].iloc[-1]), last_loss_step=int(eff["step"].iloc[-1]),
                   smoothed_last=float(smooth(eff["loss"], span).iloc[-1]))
    out["restarts"] = len(run.resumes)
    out["resume_steps"] = [int(s) for s in run.resumes["step"]] if len(run.resumes) else []
    out["segments"] = int(L["segment"].max()) + 1 if len(L) else 0
    out["clips_per_s_mean"] = float(L["clips_per_s"].mean()) if len(L) and L["clips_per_s"].notna().any() else None
    out["step_time_median"] = float(L["step_time"].median()) if len(L) and L["step_time"].notna().any() else None
    seg = segment_times(run)
    if len(seg):
        out["wall_s"] = float(seg["elapsed"].sum())
        out["span_s"] = float(seg["end"].max() - seg["start"].min())
        out["timed_segments"] = len(seg)
    # steps computed twice: what each resume threw away (the previous segments reached further than it)
    out["steps_redone"] = int(restart_table(run)["steps redone"].sum()) if len(run.resumes) else 0
    return out


# ---------------------------------------------------------------------------------------------- inventory
def _loss_near(losses: pd.DataFrame, step: int, when: float | None) -> tuple[float | None, float | None]:
    """Loss at the nearest logged step <= step. Where a step was logged more than once, the record logged
    before the checkpoint was written (if times are known), else the latest one."""
    if losses.empty:
        return None, None
    c = losses[losses["step"] <= step]
    if when is not None and c["time"].notna().any():
        timed = c[c["time"] <= when + 60]
        c = timed if len(timed) else c
    if c.empty:
        return None, None
    c = c[c["step"] == c["step"].max()]
    if c["time"].notna().any():
        c = c.sort_values("time", kind="stable")
    r = c.iloc[-1]
    return int(r["step"]), float(r["loss"])


def _check(path: Path, loader) -> tuple[str, dict | None]:
    from t2v.checkpoint import CheckpointError  # only reached once torch imported fine
    try:
        state = loader(path, map_location="cpu")
    except CheckpointError as e:
        msg = str(e)
        msg = msg[len(str(path)) + 2:] if msg.startswith(f"{path}: ") else msg
        if msg.startswith("refused"):
            return "refused: pickled objects", None
        if msg.startswith("corrupt"):
            m = re.match(r"corrupt(?: or truncated)?\s*\((.*)\)$", msg, re.S)
            reason = (m.group(1) if m else msg).split(". ")[0]
            return "corrupt: " + (reason[:117] + "..." if len(reason) > 120 else reason), None
        return f"invalid: {msg}", None
    except Exception as e:  # anything load_checkpoint did not anticipate is still a bad file, not a crash
        return f"corrupt: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}", None
    return "ok", state


def inventory(run_dir: str | os.PathLike, losses: pd.DataFrame | None = None, load: bool = True) -> pd.DataFrame:
    """Every ckpt_*.pt and ckpt_*.pt.corrupt of run_dir: step, time written, size, loss near its step, what it
    holds and whether it loads (with t2v.checkpoint.load_checkpoint, weights_only, on CPU). resume_pick marks
    the checkpoint a resume would take: the newest that loads and verifies (never a *.corrupt one).
    Reads only: nothing is renamed, even a broken file."""
    run_dir = Path(run_dir)
    losses = losses if losses is not None else parse_log([])
    files = sorted(((int(m.group("step")), bool(m.group("corrupt")), p) for p in run_dir.iterdir()
                    if p.is_file() and (m := CKPT_FILE_RE.match(p.name))), key=lambda t: (t[0], t[1]))
    loader, why = None, "not checked"
    if load and files:
        try:
            from t2v.checkpoint import load_checkpoint as loader
        except ImportError as e:
            why = "not checked (no torch)" if "torch" in str(e) else f"not checked ({e})"
    rows = []
    for step, quarantined, p in files:
        st = p.stat()
        status, state = _check(p, loader) if loader else (why, None)
        written, tsrc = st.st_mtime, "mtime"
        if state is not None and isinstance(state.get("time"), (int, float)) and math.isfinite(state["time"]):
            written, tsrc = float(state["time"]), "checkpoint"
        lstep, lval = _loss_near(losses, step, written)
        rows.append({
            "file": p.name, "step": step,
            "time_written": _dt.datetime.fromtimestamp(written).isoformat(timespec="seconds"),
            "time_source": tsrc, "size_mb": round(st.st_size / 2**20, 3), "loss_step": lstep, "loss_near": lval,
            "has_ema": bool(state.get("ema")) if state is not None else None,
            "has_optimizer": bool(state.get("optimizer")) if state is not None else None,
            "status": status + (" (quarantined)" if quarantined and status == "ok" else ""),
            "resume_pick": False,
        })
        del state
    df = pd.DataFrame(rows, columns=INVENTORY_COLUMNS)
    ok = df.index[(df["status"] == "ok") & ~df["file"].str.endswith(".corrupt")]
    if len(ok):
        df.loc[df.loc[ok, "step"].idxmax(), "resume_pick"] = True
    df["resume_pick"] = df["resume_pick"].astype(bool)
    return df


# ------------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _message_figure(path: Path, title: str, message: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True, fontsize=12, transform=ax.transAxes)
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _mark_resumes(ax, run: Run, color: str, label: str | None) -> None:
    for i, s in enumerate(run.resumes["step"] if len(run.resumes) else []):
        ax.axvline(float(s), color=color, ls="--", lw=1.0, alpha=0.7, label=label if i == 0 else None)


def plot_loss(runs: Sequence[Run], path: str | os.PathLike, log_scale: bool = False, smooth_span: int = 0) -> Path:
    """Raw loss (thin, one line per process segment, so a replayed range shows twice), its EMA, the learning
    rate on a second y axis, dashed lines where the job resumed. Several runs overlay with a legend."""
    path = Path(path)
    runs = [r for r in runs if len(r.losses)]
    if not runs:
        return _message_figure(path, "loss", "no loss records found\n(no metrics.jsonl, no step lines in the logs)")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(11, 5.5), dpi=100)
    ax2 = None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    many = len(runs) > 1
    for i, run in enumerate(runs):
        c = colors[i % len(colors)]
        pre = f"{run.name}: " if many else ""
        L, eff = run.losses, effective(run.losses)
        span = smooth_span or auto_smooth(len(eff))
        for j, (_, seg) in enumerate(L.groupby("segment", sort=True)):
            ax.plot(seg["step"], seg["loss"], color=c, lw=0.8, alpha=0.45, label=f"{pre}loss" if j == 0 else None)
        ax.plot(eff["step"], smooth(eff["loss"], span), color=c, lw=2.0, label=f"{pre}loss EMA ({span})")
        _mark_resumes(ax, run, c, f"{pre}resume")
        if eff["lr"].notna().any():
            ax2 = ax2 or ax.twinx()
            ax2.plot(eff["step"], eff["lr"], color=c, lw=1.0, ls=":", label=f"{pre}lr")
    if log_scale:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss" + (" (log scale)" if log_scale else ""))
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if ax2 is not None:
        ax2.set_ylabel("learning rate")
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, loc="upper right", fontsize=8)
    ax.set_title("loss: " + (", ".join(r.name for r in runs) if many else runs[0].name))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_throughput(run: Run, path: str | os.PathLike) -> Path:
    """clips/s and step time against step (two panels), dashed lines at resumes."""
    path = Path(path)
    L = run.losses
    if L.empty or not (L["clips_per_s"].notna().any() or L["step_time"].notna().any()):
        return _message_figure(path, f"throughput: {run.name}",
                               "no throughput data\n(the text log has no clips/s or step time; "
                               "metrics.jsonl is missing or has none)")
    plt = _plt()
    fig, axes = plt.subplots(2, 1, figsize=(11, 6.5), dpi=100, sharex=True)
    for ax, col, label in ((axes[0], "clips_per_s", "clips/s"), (axes[1], "step_time", "step time (s)")):
        for j, (_, seg) in enumerate(L.groupby("segment", sort=True)):
            ax.plot(seg["step"], seg[col], color="C0", lw=1.0, marker=".", ms=3, label=label if j == 0 else None)
        _mark_resumes(ax, run, "C3", "resume")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        if not L[col].notna().any():
            ax.text(0.5, 0.5, f"no {label} data", ha="center", va="center", transform=ax.transAxes)
        ax.legend(loc="upper right", fontsize=8)
    axes[1].set_xlabel("step")
    axes[0].set_title(f"throughput: {run.name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# What an eval file records about how it was made (t2v.eval): settings, not metrics to plot.
EVAL_SETTINGS = ("step", "num", "file", "seed", "ddim_steps", "guidance", "frames", "size", "time", "batch_size")


def eval_metrics(evals: pd.DataFrame) -> list[str]:
    return [c for c in evals.columns if c not in EVAL_SETTINGS
            and pd.api.types.is_numeric_dtype(evals[c]) and not pd.api.types.is_bool_dtype(evals[c])
            and evals[c].notna().any()]


def plot_eval(run: Run, path: str | os.PathLike) -> Path | None:
    """Each numeric eval metric against step (needs >= 2 eval files)."""
    metrics = eval_metrics(run.evals)
    if len(run.evals) < 2 or not metrics:
        return None
    plt = _plt()
    fig, axes = plt.subplots(len(metrics), 1, figsize=(9, 3 * len(metrics) + 1), dpi=100, sharex=True,
                             squeeze=False)
    for ax, m in zip(axes[:, 0], metrics):
        ax.plot(run.evals["step"], run.evals[m], marker="o")
        ax.set_ylabel(m)
        ax.grid(True, alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(f"evaluation: {run.name}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_val(run: Run, path: str | os.PathLike) -> Path | None:
    """Validation loss against step, one curve per fixed timestep (needs >= 1 record)."""
    per_t = [c for c in run.val.columns if c.startswith("val_loss_t")]
    if run.val.empty or not per_t:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for c in per_t:
        ax.plot(run.val["step"], run.val[c], marker="o", label=f"t = {c[len('val_loss_t'):]}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (EMA, fixed noise)")
    ax.set_title(f"validation loss at fixed timesteps: {run.name}")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


# ---------------------------------------------------------------------------------------------- markdown
def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "yes" if v else "no"
    if isinstance(v, (float, np.floating)):
        return _g(float(v))
    return str(v).replace("|", "\\|").replace("\n", " ")


def _g(x: float | None, digits: int = 4) -> str:
    """Fixed-point with up to `digits` decimals (trailing zeros dropped); scientific when tiny or huge."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if x == 0 or 10 ** -(digits - 1) <= abs(x) < 1e6:
        return f"{x:.{digits}f}".rstrip("0").rstrip(".")
    return f"{x:.{digits - 1}e}"


def md_table(df: pd.DataFrame) -> str:
    if df is None or df.empty:
        return "(none)\n"
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join(lines) + "\n"


def _dur(s: float) -> str:
    s = int(round(s))
    h, m, sec = s // 3600, s % 3600 // 60, s % 60
    return f"{h}h {m:02d}m {sec:02d}s" if h else f"{m}m {sec:02d}s"


def _target_steps(cfg: dict | None) -> int | None:
    try:
        return int(cfg["train"]["steps"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None


def write_checkpoint_tables(inv: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    csv, md = out_dir / "checkpoints.csv", out_dir / "checkpoints.md"
    inv.to_csv(csv, index=False)
    md.write_text("# Checkpoints\n\nresume_pick: the checkpoint a resume would load (the newest that loads and "
                  "verifies; *.corrupt files are never picked).\n\n" + md_table(inv), encoding="utf-8")
    return csv, md


def write_summary(run: Run, out_dir: str | os.PathLike, inv: pd.DataFrame | None = None,
                  smooth_span: int = 0, figures: dict[str, Path | None] | None = None) -> Path:
    """summary.md: progress numbers, restarts, duplicated steps, checkpoints, evaluation, figures."""
    out_dir = Path(out_dir)
    s = stats(run, smooth_span)
    figures = figures or {}
    rel = lambda p: Path(os.path.relpath(p, out_dir)).as_posix()  # noqa: E731
    L = [f"# Run report: {run.name}", "", f"Run folder: `{run.path}`  ",
         f"Read: {'; '.join(run.sources) or 'nothing (no metrics.jsonl, no train.log or slurm-*.out)'}", ""]
    L += ["## Progress", ""]
    target = _target_steps(run.config)
    if s["last_step"] is None:
        L.append("- steps done: 0 (no loss records found)")
    else:
        pct = f" of {target} ({100 * s['last_step'] / target:.0f}%)" if target else ""
        L.append(f"- steps done: {s['last_step']}{pct} (highest step logged)")
    if "wall_s" in s:
        gap = s["span_s"] - s["wall_s"]
        L.append(f"- wall time: {_dur(s['wall_s'])} ({s['wall_s']:.0f} s): sum over {s['timed_segments']} process "
                 f"segment(s) of first-to-last timestamp in metrics.jsonl; excludes {_dur(gap)} ({gap:.0f} s) "
                 f"between segments (queue/requeue waits); calendar span {_dur(s['span_s'])} ({s['span_s']:.0f} s)")
    else:
        L.append("- wall time: unknown (the text log has no timestamps and there is no metrics.jsonl)")
    steps = ", ".join(str(x) for x in s["resume_steps"])
    L.append(f"- restarts: {s['restarts']}" + (f" (resumed at step {steps})" if steps else "")
             + (f"; {s['steps_redone']} step(s) computed again after resuming from an older checkpoint"
                if s["steps_redone"] else "")
             + (f"; {s['segments']} process segments in the logs (some restarts left no resume marker)"
                if s["segments"] > s["restarts"] + 1 else ""))
    if "best_loss" in s:
        L.append(f"- best loss: {_g(s['best_loss'])} at step {s['best_step']}")
        how = f"EMA over {s['smooth_span']} points" if s["smooth_span"] > 1 else "smoothing off"
        L.append(f"- last loss: {_g(s['last_loss'])} at step {s['last_loss_step']} "
                 f"(smoothed, {how}: {_g(s['smoothed_last'])})")
    L.append(f"- mean clips/s: {_g(s['clips_per_s_mean'], 3)}" if s["clips_per_s_mean"] is not None
             else "- mean clips/s: n/a (no throughput data)")
    if s["step_time_median"] is not None:
        L.append(f"- median step time: {_g(s['step_time_median'], 3)} s")
    if run.latest_sample is not None:
        p = rel(run.latest_sample)
        L += ["", f"Latest sample grid: [{run.latest_sample.name}]({p})", "", f"![latest sample]({p})"]
    L += ["", "## Figures", ""]
    for key in ("loss", "throughput", "val", "eval"):
        if figures.get(key):
            L.append(f"![{key}]({rel(figures[key])})")
    if len(run.resumes):
        L += ["", "## Restarts", "", md_table(restart_table(run))]
    dup = run.duplicates
    L += ["", "## Duplicated steps", ""]
    if dup.empty:
        L.append("No step was logged twice.")
    else:
        n_bad = int((~dup["agree"]).sum())
        L += [f"{dup['step'].nunique()} step(s) were logged again after a resume from an older checkpoint; "
              f"{n_bad} of {len(dup)} repeat(s) disagree with the first value "
              f"(tolerance rtol {AGREE_RTOL:g}, atol {AGREE_ATOL:g}). Both values are kept in the data; "
              "curves and the last loss use the later one.", "", md_table(dup)]
    L += ["", "## Checkpoints", ""]
    L.append(md_table(inv) if inv is not None else "(not inventoried)")
    L += ["", "## Validation loss", ""]
    if run.val.empty:
        L.append("No validation records (train.val_every = 0, or no validation manifest).")
    else:
        L += ["EMA model, fixed clips, timesteps and noise: comparable across steps, restarts and runs.", "",
              md_table(run.val.tail(10))]
    if run.demo_check is not None:
        d = run.demo_check
        L += ["", "## Demo check", "",
              f"Step {d.get('step')}: {d.get('num')} prompts sampled (DDIM {d.get('ddim_steps')}, guidance "
              f"{d.get('guidance')}) and judged by their pixels (tools/demo_check.py).", "",
              md_table(pd.DataFrame([{"colour": d.get("color"), "shape": d.get("shape"), "motion": d.get("motion"),
                                      "all three": d.get("all"), "background brightness": d.get("background")}])),
              "", "Chance: colour 25%, shape 33%, motion 25%; background brightness 0 = black."]
    L += ["", "## Evaluation", ""]
    if run.evals.empty:
        L.append("No eval/step_*.json files.")
    else:
        cols = ["step"] + eval_metrics(run.evals) + [c for c in ("num", "file") if c in run.evals]
        L.append(md_table(run.evals[cols]))
    if run.notes:
        L += ["", "## Notes", ""] + [f"- {n}" for n in run.notes]
    path = out_dir / "summary.md"
    path.write_text("\n".join(L).rstrip() + "\n", encoding="utf-8")
    return path


def write_compare(runs: Sequence[Run], out_dir: Path, smooth_span: int, overlay: Path) -> Path:
    rows = []
    for r in runs:
        s = stats(r, smooth_span)
        rows.append({"run": r.name, "steps done": s["last_step"], "best loss": s.get("best_loss"),
                     "last loss": s.get("last_loss"), "smoothed last": s.get("smoothed_last"),
                     "restarts": s["restarts"], "mean clips/s": s["clips_per_s_mean"],
                     "wall time": _dur(s["wall_s"]) if "wall_s" in s else "unknown",
                     "report": Path(os.path.relpath(r.path / "report" / "summary.md", out_dir)).as_posix()})
    path = out_dir / "compare.md"
    path.write_text(f"# Runs compared\n\n![loss]({overlay.name})\n\n" + md_table(pd.DataFrame(rows)),
                    encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------- CLI
def report_run(run: Run, out_dir: Path, log_scale: bool = False, smooth_span: int = 0, load: bool = True) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"loss": plot_loss([run], out_dir / "loss.png", log_scale, smooth_span),
               "throughput": plot_throughput(run, out_dir / "throughput.png"),
               "val": plot_val(run, out_dir / "val.png"),
               "eval": plot_eval(run, out_dir / "eval.png")}
    inv = inventory(run.path, run.losses, load=load)
    write_checkpoint_tables(inv, out_dir)
    return write_summary(run, out_dir, inv, smooth_span, figures)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folder(s); several are overlaid in one plot")
    ap.add_argument("--log-scale", action="store_true", help="loss axis in log scale")
    ap.add_argument("--smooth", type=int, default=0, metavar="N",
                    help="EMA span in logged points for the smoothed loss (default: about 5%% of the points)")
    ap.add_argument("--out", type=Path, default=None,
                    help="one run: where its report goes (default RUN_DIR/report); several runs: where the "
                         "overlay goes (default: the first run's report folder)")
    ap.add_argument("--no-load", action="store_true", help="list checkpoints without loading them (fast)")
    a = ap.parse_args(argv)
    if a.smooth < 0:
        ap.error("--smooth must be >= 0")
    runs = []
    for d in a.runs:
        try:
            runs.append(load_run(d))
        except FileNotFoundError as e:
            print(f"report: {e}", file=sys.stderr)
            return 2
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:  # runs/a/run and runs/b/run: tell them apart in the overlay
            run.name = str(run.path)
    for run in runs:
        out = a.out if (a.out is not None and len(runs) == 1) else run.path / "report"
        summary = report_run(run, out, a.log_scale, a.smooth, load=not a.no_load)
        if run.losses.empty:
            print(f"report: warning: {run.path}: no loss records found", file=sys.stderr)
        print(f"{run.name}: {summary}")
    if len(runs) > 1:
        out = a.out or runs[0].path / "report"
        out.mkdir(parents=True, exist_ok=True)
        overlay = plot_loss(runs, out / "loss_overlay.png", a.log_scale, a.smooth)
        print(f"overlay: {overlay}\ncompare: {write_compare(runs, out, a.smooth, overlay)}")
    return 0


if __name__ == "__main__":
    _root = str(Path(__file__).resolve().parents[1])
    if _root not in sys.path:  # `python tools/report.py` from a checkout that is not pip-installed
        sys.path.insert(1, _root)
    sys.exit(main())
