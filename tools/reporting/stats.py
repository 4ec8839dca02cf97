"""Numbers derived from a loaded run: the effective loss history, smoothing, wall time per process segment,
restarts, and the figures of the summary (steps logged twice are parse.find_duplicates, which Run offers).

Kept apart from parsing so that each number has one definition, shared by summary.md, compare.md and the plots
(the smoothed curve in loss.png is the `smoothed last` of the summary). Pure pandas: nothing is read here.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from t2v import runlog

if TYPE_CHECKING:  # for the annotations only: stats work from a Run, which never imports this module
    from tools.reporting.run import Run


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
    # previews that raised: training warned in train.log and went on (metrics.jsonl only; the baseline had none)
    out["preview_failures"] = run.count(runlog.PREVIEW_FAILED)
    return out
