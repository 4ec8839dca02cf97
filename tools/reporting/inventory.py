"""The files a run leaves beside its logs: checkpoints, preview grids and evaluation results.

The checkpoint inventory answers "what would a resume load, and what is broken": every ckpt_*.pt (and the
*.corrupt files a resume quarantined) is loaded with t2v.checkpoint.load_checkpoint (weights_only, on CPU), so a
pickled object is refused, never executed. A sharded checkpoint's folder (ckpt_*/, train.parallel=fsdp) is checked
as a resume checks it, without reading its shards: every rank's file there and whole, its train state loading. It
never calls t2v.checkpoint.load_latest, which would rename broken files: the report only reads. torch is imported
on the first checkpoint only, so that the rest of the report works on a login node without it (the checkpoints are
then listed as "not checked").
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
from pathlib import Path

import pandas as pd

from tools.reporting.parse import parse_log

INVENTORY_COLUMNS = ["file", "step", "time_written", "time_source", "size_mb", "loss_step", "loss_near",
                     "has_ema", "has_optimizer", "status", "resume_pick"]
CKPT_FILE_RE = re.compile(r"^ckpt_(?P<step>\d+)(?P<file>\.pt)?(?P<corrupt>\.corrupt\d*)?$")
SAMPLE_RE = re.compile(r"^preview_step(?P<step>\d+)\.png$")
EVAL_RE = re.compile(r"^step_(?P<step>\d+)\.json$")
# What an eval file records about how it was made (t2v.eval): settings, not metrics to plot.
EVAL_SETTINGS = ("step", "num", "file", "seed", "ddim_steps", "guidance", "frames", "size", "time", "batch_size")


# ------------------------------------------------------------------------------------ samples and evals
def samples(run_dir: Path) -> list[Path]:
    """samples/preview_step*.png, oldest step first."""
    found = [(int(m.group("step")), p) for p in (run_dir / "samples").glob("preview_step*.png")
             if (m := SAMPLE_RE.match(p.name))]
    return [p for _, p in sorted(found, key=lambda t: t[0])]


def read_evals(run_dir: Path, notes: list[str] | None = None) -> pd.DataFrame:
    """One row per eval/step_*.json (t2v.eval), by step; an unreadable file is noted and left out."""
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


def eval_metrics(evals: pd.DataFrame) -> list[str]:
    """The numeric columns of the eval files that are metrics (CLIPSIM, FVD, ...), not settings."""
    return [c for c in evals.columns if c not in EVAL_SETTINGS
            and pd.api.types.is_numeric_dtype(evals[c]) and not pd.api.types.is_bool_dtype(evals[c])
            and evals[c].notna().any()]


def read_demo_check(run_dir: Path, notes: list[str]) -> dict | None:
    """eval/demo_check.json (tools/demo_check.py), or None."""
    p = run_dir / "eval" / "demo_check.json"
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except ValueError as e:
        notes.append(f"eval/demo_check.json: unreadable ({e})")
        return None


# ------------------------------------------------------------------------------------------ checkpoints
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
    """(status, state) of one checkpoint file; state is None unless it loaded."""
    from t2v.checkpoint import CheckpointError  # only reached once torch imported fine
    try:
        state = loader(path, map_location="cpu")
    except CheckpointError as e:
        msg = str(e)
        # what follows the checkpoint's own name: "corrupt ...", or in a folder "__1_0.distcp: missing ..."
        msg = next((msg[len(pre):] for pre in (f"{path}: ", f"{path}/") if msg.startswith(pre)), msg)
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
    """Every ckpt_*.pt, sharded ckpt_*/ folder and quarantined *.corrupt of run_dir: step, time written, size,
    loss near its step, what it holds and whether it loads (with t2v.checkpoint.load_checkpoint, weights_only, on
    CPU). resume_pick marks the checkpoint a resume would take: the newest that loads and verifies (never a
    *.corrupt one). Reads only: nothing is renamed, even a broken file."""
    run_dir = Path(run_dir)
    losses = losses if losses is not None else parse_log([])
    files = sorted(((int(m.group("step")), bool(m.group("corrupt")), p) for p in run_dir.iterdir()
                    if (m := CKPT_FILE_RE.match(p.name)) and p.is_file() == bool(m.group("file"))),
                   key=lambda t: (t[0], t[1]))
    loader, why = None, "not checked"
    if load and files:
        try:
            from t2v.checkpoint import load_checkpoint, load_resume_state

            def loader(path, map_location="cpu"):  # a folder: checked as a resume checks it, shards unread
                if not path.is_dir():
                    return load_checkpoint(path, map_location=map_location)
                return {**load_resume_state(path), "ema": True, "optimizer": True}  # .metadata lists both
        except ImportError as e:
            why = "not checked (no torch)" if "torch" in str(e) else f"not checked ({e})"
    rows = []
    for step, quarantined, p in files:
        st = p.stat()
        # every rank's file (t2v.checkpoint.size_of's sum, here without importing torch)
        size = sum(f.stat().st_size for f in p.iterdir()) if p.is_dir() else st.st_size
        status, state = _check(p, loader) if loader else (why, None)
        written, tsrc = st.st_mtime, "mtime"
        if state is not None and isinstance(state.get("time"), (int, float)) and math.isfinite(state["time"]):
            written, tsrc = float(state["time"]), "checkpoint"
        lstep, lval = _loss_near(losses, step, written)
        rows.append({
            "file": p.name + "/" * p.is_dir(), "step": step,
            "time_written": _dt.datetime.fromtimestamp(written).isoformat(timespec="seconds"),
            "time_source": tsrc, "size_mb": round(size / 2**20, 3), "loss_step": lstep, "loss_near": lval,
            "has_ema": bool(state.get("ema")) if state is not None else None,
            "has_optimizer": bool(state.get("optimizer")) if state is not None else None,
            "status": status + (" (quarantined)" if quarantined and status == "ok" else ""),
            "resume_pick": False,
        })
        del state  # one checkpoint's tensors in memory at a time
    df = pd.DataFrame(rows, columns=INVENTORY_COLUMNS)
    ok = df.index[(df["status"] == "ok") & ~df["file"].str.contains(r"\.corrupt\d*/?$")]
    if len(ok):
        df.loc[df.loc[ok, "step"].idxmax(), "resume_pick"] = True
    df["resume_pick"] = df["resume_pick"].astype(bool)
    return df
