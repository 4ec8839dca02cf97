"""One run folder, loaded once: the Run that the statistics, plots and Markdown work from.

load_run reads metrics.jsonl a single time (losses, events and validation records come from the same
records), the text logs only for what metrics.jsonl does not cover, and lists the samples, eval files and
config. It reads only: nothing in the run folder is renamed or written, and torch is not imported.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from t2v import runlog
from tools.reporting import inventory, parse


@dataclass
class Run:
    path: Path
    name: str
    losses: pd.DataFrame  # LOSS_COLUMNS, chronological (as logged), repeats kept
    events: pd.DataFrame  # EVENT_COLUMNS: t2v.runlog's events (start, resume, checkpoint, val, preempt, ...)
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
        return parse.find_duplicates(self.losses)

    @property
    def latest_sample(self) -> Path | None:
        return self.samples[-1] if self.samples else None

    def count(self, event: str) -> int:
        """How many t2v.runlog events of this name the run recorded."""
        return int((self.events["event"] == event).sum()) if len(self.events) else 0


def load_run(run_dir: str | os.PathLike) -> Run:
    """Everything the report needs from a run folder, without torch. Reads only."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    notes: list[str] = []
    sources: list[str] = []
    log_steps, log_events, log_files = parse.read_logs(run_dir)
    if not log_files and not (run_dir / "metrics.jsonl").is_file():
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl and no train.log or slurm-*.out: nothing to report "
                                "(training writes them from its first line; is this the run folder, OUTDIR?)")
    met_steps, met_events = parse.empty_frames()
    val = parse.val_frame([])
    if (run_dir / "metrics.jsonl").is_file():
        skipped: list[tuple[int, bool]] = []
        records = runlog.read_records(run_dir, skipped)
        met_steps, met_events = parse.metrics_frames(records, skipped, notes)
        val = parse.val_frame(records)
        sources.append(f"metrics.jsonl ({len(met_steps)} step records, {len(met_events)} events)")
    if log_files:
        names = ", ".join(p.name for p in log_files)
        sources.append(f"{names} ({len(log_steps)} step lines)")
    losses = parse.merge_losses(met_steps, log_steps)
    if len(met_steps) or len(met_events):
        # metrics.jsonl tells the run's facts; the log's events count only for the part before it began.
        # Log records put in front of the metrics shift its segment numbers: keep its events in step.
        offset = 0
        from_metrics = losses["source"] == "metrics"
        if len(met_steps) and from_metrics.any():
            offset = int(losses.loc[from_metrics, "segment"].iloc[0]) - int(met_steps["segment"].iloc[0])
            met_events = met_events.assign(segment=met_events["segment"] + offset)
        log_events = log_events[log_events["segment"] < offset]
    events = pd.concat([e for e in (met_events, log_events) if len(e)], ignore_index=True) \
        if len(met_events) or len(log_events) else met_events
    return Run(path=run_dir, name=run_dir.resolve().name, losses=losses, events=events,
               resumes=parse.resumes(log_events, met_events), evals=inventory.read_evals(run_dir, notes),
               samples=inventory.samples(run_dir), val=val, demo_check=inventory.read_demo_check(run_dir, notes),
               config=parse.read_config(run_dir / "config.yaml", notes), sources=sources, notes=notes)
