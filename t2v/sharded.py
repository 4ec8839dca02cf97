"""Sharded checkpoints (``train.parallel=fsdp``): one folder a save, ``OUTDIR/ckpt_000200/``, written by every rank.

    ckpt_000200/
      __0_0.distcp, __1_0.distcp ...   each rank's shards of model, EMA and Adam state (torch.distributed.checkpoint)
      .metadata                        which shard lies where; DCP writes it last, after every rank's data
      train_state.pt                   what is not sharded: step, config, data section, grad scaler, every rank's RNG

A save goes into ``.ckpt_000200.tmp/`` and rank 0 renames it to ``ckpt_000200/`` once ``.metadata`` and
``train_state.pt`` are in it: a folder with the final name is complete, and a save killed at any point leaves only
the temporary folder, which the next start removes. (DCP's own commit marker, ``.metadata``, is not enough on its
own: a folder overwritten in place keeps the old ``.metadata`` beside torn data; ../shared/notes/fsdp.md.)

A folder loads into any world size and into either kind of model: DCP reads each rank's part of every tensor,
whoever wrote it (``load_into``), and ``load_full`` reads it whole in one process for sampling, eval, reports and
``python -m t2v.export``. The tensors are keyed by parameter name (torch.distributed.checkpoint.state_dict), the
optimizer too: ``optimizer_by_index`` and ``optimizer_by_name`` convert to and from ``Optimizer.state_dict()``'s
numbering, which single-file checkpoints keep.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

TRAIN_STATE = "train_state.pt"
DIR_RE = re.compile(r"^ckpt_(\d+)$")
TMP_PREFIX = "."  # .ckpt_000200.tmp: hidden, and never matched by DIR_RE
RANK_FILE_RE = re.compile(r"^__(\d+)_\d+\.distcp$")


class ShardedError(RuntimeError):
    """A sharded checkpoint folder that is incomplete or damaged (which file, and which rank wrote it)."""


def tmp_dir(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{final.name}.tmp")


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions()


def _no_dist() -> bool:
    return not (dist.is_available() and dist.is_initialized())


def tensors(model, ema, opt) -> dict[str, Any]:
    """Model, EMA and optimizer state as DCP saves and loads them: this rank's shards (DTensors) of a sharded model,
    whole tensors of a plain one, keyed by parameter name. A pretrained model's holds only what trains."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"model": get_model_state_dict(model, options=_options()),
            "ema": get_model_state_dict(ema, options=_options()),
            "optimizer": get_optimizer_state_dict(model, opt, options=_options())}


def save(final: Path, model, ema, opt, train_state: dict | None, is_main: bool) -> Path:
    """Every rank calls this at the same step. Rank 0 passes ``train_state`` (the unsharded part) and renames the
    finished folder into place; returns ``final``."""
    import torch.distributed.checkpoint as dcp

    from t2v.files import SAVE_PAUSE_ENV, fsync_dir

    tmp = tmp_dir(final)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save killed before this one
        tmp.mkdir(parents=True)
    if not _no_dist():
        dist.barrier()  # the folder exists before any rank writes into it
    dcp.save(tensors(model, ema, opt), checkpoint_id=str(tmp), no_dist=_no_dist())  # .metadata last, on rank 0
    if is_main:
        time.sleep(float(os.environ.get(SAVE_PAUSE_ENV) or 0))  # tests only: a SIGKILL lands inside the save
        with open(tmp / TRAIN_STATE, "wb") as f:
            torch.save(train_state, f)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (a resume that stopped where it started): replace it whole
            old = final.with_name(f"{TMP_PREFIX}{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    if not _no_dist():
        dist.barrier()  # no rank goes on (or exits) before the folder has its final name
    return final


def check(path: Path) -> None:
    """Raise ShardedError unless ``path`` is a complete sharded checkpoint: its ``.metadata`` and train state are
    there, and every data file the metadata names exists and is long enough (a torn or missing rank file is named,
    with the rank that wrote it)."""
    from torch.distributed.checkpoint import FileSystemReader

    if not (path / ".metadata").is_file():
        raise ShardedError(f"{path}: no .metadata (the save did not finish)")
    if not (path / TRAIN_STATE).is_file():
        raise ShardedError(f"{path}: no {TRAIN_STATE} (not a t2v sharded checkpoint, or the save did not finish)")
    try:
        meta = FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # a torn .metadata: pickle and EOF errors alike
        raise ShardedError(f"{path}/.metadata: unreadable ({type(e).__name__}: {e})") from None
    need: dict[str, int] = {}
    for info in (meta.storage_data or {}).values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    ranks = len(need)
    for name, size in sorted(need.items()):
        f = path / name
        m = RANK_FILE_RE.match(name)
        who = f" (written by rank {m.group(1)} of {ranks})" if m else ""
        if not f.is_file():
            raise ShardedError(f"{f}: missing{who}; the checkpoint cannot be read without it")
        if f.stat().st_size < size:
            raise ShardedError(f"{f}: truncated{who}: {f.stat().st_size} bytes, the metadata needs {size}")


def load_train_state(path: Path) -> dict:
    return torch.load(path / TRAIN_STATE, map_location="cpu", weights_only=True)


def load_into(path: Path, model, ema, opt) -> None:
    """Every rank: its part of model, EMA and optimizer state from ``path``, whatever world size wrote it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = tensors(model, ema, opt)
    dcp.load(state, checkpoint_id=str(path), no_dist=_no_dist())
    set_model_state_dict(model, state["model"], options=_options())
    set_model_state_dict(ema, state["ema"], options=_options())
    set_optimizer_state_dict(model, opt, state["optimizer"], options=_options())


def load_full(path: Path) -> dict[str, Any]:
    """The whole checkpoint in this process: train state plus full model, EMA and optimizer tensors (optimizer
    keyed by parameter name). Reads every rank's file; needs no process group."""
    # torch's own dcp_to_torch_save reads a checkpoint whole this way (an empty state dict, no_dist)
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    check(path)
    state = load_train_state(path)
    full: dict[str, Any] = {}
    _load_state_dict(full, storage_reader=FileSystemReader(str(path)), planner=_EmptyStateDictLoadPlanner(),
                     no_dist=True)
    return {**state, **full}


def save_full(state: dict[str, Any], final: Path) -> Path:
    """Write a whole checkpoint (``load_full``'s shape: optimizer keyed by name) as a sharded folder from one
    process; it loads on any number of ranks."""
    import torch.distributed.checkpoint as dcp

    from t2v.files import fsync_dir

    tmp = tmp_dir(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({k: state[k] for k in ("model", "ema", "optimizer")}, checkpoint_id=str(tmp), no_dist=True)
    buf = io.BytesIO()
    torch.save({k: v for k, v in state.items() if k not in ("model", "ema", "optimizer")}, buf)
    (tmp / TRAIN_STATE).write_bytes(buf.getvalue())
    fsync_dir(tmp)
    os.replace(tmp, final)
    return final


def optimizer_by_index(by_name: dict) -> dict:
    """An optimizer state keyed by parameter name -> ``Optimizer.state_dict()``'s form (parameters numbered in the
    order of its groups), which single-file checkpoints hold."""
    order = [n for g in by_name["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(order)}
    return {"state": {index[n]: s for n, s in by_name["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]}


def optimizer_by_name(by_index: dict, names: list[str]) -> dict:
    """The inverse: ``names`` are the optimizer's parameters in its order (what trains, as the model names it)."""
    if len(names) != sum(len(g["params"]) for g in by_index["param_groups"]):
        raise ShardedError(f"the optimizer state holds {sum(len(g['params']) for g in by_index['param_groups'])} "
                           f"parameters, the model trains {len(names)}")
    return {"state": {names[i]: s for i, s in by_index["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in by_index["param_groups"]]}
