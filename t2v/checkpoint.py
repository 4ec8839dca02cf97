"""Checkpoints: atomic save, verified load, keep-last-k, newest-valid lookup.

A checkpoint is `OUTDIR/ckpt_NNNNNN.pt`, or with train.parallel=fsdp a folder `OUTDIR/ckpt_NNNNNN/` that every rank
writes its shards into (t2v.sharded); everything here takes either. A file is a plain dict of tensors and primitives so that it loads with
`torch.load(weights_only=True)`: a file that carries arbitrary pickled objects is refused, never executed.
Writes go to a temporary file in the same folder, are fsync'ed and then renamed over the final name, so
a job killed mid-save leaves either the old set of checkpoints or the new one, never a torn file.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import random
import re
import shutil
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from t2v import sharded
from t2v.files import SAVE_PAUSE_ENV, atomic_write

log = logging.getLogger("t2v.checkpoint")

FORMAT_VERSION = 1
CKPT_RE = re.compile(r"^ckpt_(\d+)\.pt$")
# What a training checkpoint must hold to resume from it. (Baseline checkpoints had step/model/ema only.)
REQUIRED_KEYS = ("format", "step", "model", "ema", "optimizer", "config", "rng", "data")


class CheckpointError(RuntimeError):
    pass


class CheckpointReadError(CheckpointError):
    """The file could not be read (an I/O error, e.g. a passing network file system fault): says nothing about
    its content, so it is never quarantined as corrupt."""


READ_RETRIES = (0.5, 2.0, 5.0)  # seconds between attempts at a read that failed with an I/O error


def ckpt_path(outdir: str | os.PathLike, step: int) -> Path:
    return Path(outdir) / f"ckpt_{step:06d}.pt"


def step_of(path: Path) -> int | None:
    """The step in a checkpoint's name (`ckpt_000200.pt` or the folder `ckpt_000200`), None for other names."""
    m = CKPT_RE.match(path.name) or sharded.DIR_RE.match(path.name)
    return int(m.group(1)) if m else None


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint's folder (not a run folder that holds checkpoints)."""
    return path.is_file() or (path.is_dir() and step_of(path) is not None and (path / ".metadata").is_file())


def size_of(path: Path) -> int:
    """Bytes of a checkpoint file, or of every file of a sharded folder."""
    return sum(f.stat().st_size for f in path.iterdir()) if path.is_dir() else path.stat().st_size


def list_checkpoints(outdir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every `ckpt_NNNNNN.pt` file and `ckpt_NNNNNN/` folder in outdir, oldest first (a folder only
    has its final name once its save finished: t2v.sharded)."""
    d = Path(outdir)
    if not d.is_dir():
        return []
    found = [(s, p) for p in d.iterdir()
             if (s := step_of(p)) is not None and p.is_dir() == bool(sharded.DIR_RE.match(p.name))]
    return sorted(found, key=lambda sp: (sp[0], sp[1].is_dir()))


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write atomically (t2v.files.atomic_write: temp file in the same folder, fsync, rename, fsync the folder)."""
    with atomic_write(path) as f:
        pause = float(os.environ.get(SAVE_PAUSE_ENV) or 0)
        if pause:
            buf = io.BytesIO()
            torch.save(state, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            time.sleep(pause)
            f.write(data[len(data) // 2:])
        else:
            torch.save(state, f)
    return Path(path)


def _read(path: Path) -> bytes:
    """The file's bytes, retrying I/O errors (READ_RETRIES); CheckpointReadError if they persist."""
    for wait in (*READ_RETRIES, None):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise
        except OSError as e:
            if wait is None:
                raise CheckpointReadError(f"{path}: cannot be read ({e}); not renamed, since the file itself may be "
                                          f"fine; retry when the file system is back") from None
            log.warning("warning: %s: read failed (%s); retrying in %g s", path, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify one checkpoint, a file or a sharded folder (read whole, in this process). Raises
    CheckpointError with the reason (CheckpointReadError when the file could not be read at all); never unpickles
    code."""
    path = Path(path)
    if path.is_dir():
        return _load_folder(path)
    try:
        data = _read(path)  # read first, parse from memory: an I/O error is told apart from bad bytes
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # weights_only=True raises this both for forbidden globals and for garbage bytes.
        reason = "refused: it holds pickled objects other than tensors" if "global" in str(e).lower() else "corrupt"
        raise CheckpointError(f"{path}: {reason} ({_cause(e)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated ({_cause(e)})") from None
    verify_state(state, path)
    return state


@contextmanager
def _folder_errors(path: Path, read: Path):
    """A sharded folder's failures told as a file's are: a ShardedError (a missing or torn rank file) or bad bytes
    in ``read`` -> CheckpointError (quarantined), an I/O error -> CheckpointReadError (never quarantined)."""
    try:
        yield
    except sharded.ShardedError as e:
        raise CheckpointError(str(e)) from None
    except OSError as e:
        raise CheckpointReadError(f"{path}: cannot be read ({e}); retry when the file system is back") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{read}: corrupt or truncated ({_cause(e)})") from None


def _load_folder(path: Path) -> dict[str, Any]:
    with _folder_errors(path, path):
        state = sharded.load_full(path)
    verify_state(state, path)
    return state


def _cause(e: Exception) -> str:
    """The line of torch.load's message that says what is wrong. Its first lines advise re-running with
    weights_only=False, which is exactly what must not be done with a file one cannot trust."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    for line in lines:
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].strip()[:200]
    useful = [line for line in lines if "weights_only" not in line and "torch.load" not in line]
    return (useful or lines or [type(e).__name__])[0][:200]


def verify_state(state: Any, path: Path) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint dict")
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing {', '.join(missing)} (not a resumable t2v checkpoint)")
    named = step_of(path)
    if named is not None and named != int(state["step"]):
        raise CheckpointError(f"{path}: its name says step {named} but it holds step {state['step']}")
    for name in ("model", "ema"):
        bad = [k for k, v in state[name].items() if torch.is_tensor(v) and v.is_floating_point() and not _finite(v)]
        if bad:
            raise CheckpointError(f"{path}: non-finite values in {name} ({bad[0]})")


def _finite(t: torch.Tensor) -> bool:
    # numpy, single-threaded: hundreds of small multi-threaded torch.isfinite calls cost seconds on a busy
    # shared CPU (the resume-start row of bench/results/latest.md, "Adopted change" table)
    a = t.detach().cpu()
    return bool(np.isfinite((a.float() if a.dtype in (torch.bfloat16, torch.float16) else a).numpy()).all())


def load_resume_state(path: Path) -> dict[str, Any]:
    """What a resume reads before the model exists: a file whole; of a sharded folder, after checking that every
    rank's file is there and whole, only its train state (each rank reads its shards later: t2v.sharded.load_into)."""
    if not path.is_dir():
        return load_checkpoint(path)
    with _folder_errors(path, path / sharded.TRAIN_STATE):
        sharded.check(path)
        return sharded.load_train_state(path)


def load_latest(outdir: str | os.PathLike, load=load_checkpoint) -> tuple[dict | None, Path | None]:
    """Newest checkpoint that ``load`` reads and verifies. A broken one is renamed `*.corrupt` (kept, never
    deleted) with a warning, and the previous one is tried. One that cannot be read at all (CheckpointReadError)
    stops the search: falling back would silently throw away the newest work."""
    for step, path in reversed(list_checkpoints(outdir)):
        try:
            return load(path), path
        except CheckpointReadError:
            raise
        except CheckpointError as e:
            bad = path.with_name(path.name + ".corrupt")
            n = 1
            while bad.is_dir():  # a folder cannot replace another one: keep both
                bad, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
            log.warning("warning: %s; falling back to the previous checkpoint (kept as %s)", e, bad.name)
            os.replace(path, bad)
    return None, None


def prune(outdir: str | os.PathLike, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints (files or folders); returns what was removed."""
    ckpts = list_checkpoints(outdir)
    removed = [p for _, p in ckpts[: max(0, len(ckpts) - keep_last)]]
    for p in removed:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return removed


def clean_temp_files(outdir: str | os.PathLike) -> None:
    """Remove what a save that was killed left (it never replaced a real checkpoint): temporary files, and
    temporary folders of sharded saves."""
    d = Path(outdir)
    if d.is_dir():
        for p in d.glob(".ckpt_*.pt.tmp-*"):
            p.unlink(missing_ok=True)
        for p in [*d.glob(".ckpt_*.tmp"), *d.glob(".ckpt_*.old")]:
            shutil.rmtree(p, ignore_errors=True)


def rng_state(device: torch.device) -> dict:
    """Every global RNG this process draws from. CUDA: only this rank's own device (a list of one state), so a
    run can resume on a node with fewer or more visible GPUs."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": [torch.cuda.get_rng_state(device)] if device.type == "cuda" else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and device.type == "cuda":
        # Checkpoints hold one state (this format) or one per GPU that was visible (older ones): restore this
        # device's own where there is one, else the first, and never index past the list.
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_rng_state(cuda[index] if len(cuda) > 1 and index < len(cuda) else cuda[0], device)
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
