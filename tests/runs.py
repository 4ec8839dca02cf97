"""Helpers for tests that train: a small demo dataset with its caches, and configs pointing at it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from t2v import config as C
from t2v.data.cache import build_cache
from t2v.data.demo import make_demo
from t2v.data.manifest import read_manifest
from t2v.text import embed_captions

REPO = Path(__file__).resolve().parents[1]


def tiny_config(data_dir: Path, outdir: Path, *overrides: str, config: str = "configs/tiny.yaml") -> C.Config:
    return C.load_config(REPO / config, [
        f"data.manifest={data_dir / 'train.jsonl'}", f"data.cache_dir={data_dir / 'cache'}",
        f"text.cache_dir={data_dir / 'cache'}", f"train.outdir={outdir}", *overrides], env={})


def prepare(cfg: C.Config, n_train: int = 48) -> None:
    """What `python -m t2v.data demo`, `... cache` and `python -m t2v.text embed` do before training."""
    make_demo(Path(cfg.data.manifest).parent, n_train=n_train, n_val=4, n_test=4, seed=0)
    clips = read_manifest(cfg.data.manifest)
    build_cache(clips, cfg.data.frames, cfg.data.frame_size, C.cache_dir(cfg, "data"), progress=False)
    val = read_manifest(C.val_manifest(cfg))
    captions = [c for clip in clips + val for c in clip.captions] + list(cfg.train.sample_prompts) + [""]
    embed_captions(cfg.text, captions, C.cache_dir(cfg, "text"), progress=False)


def straight_and_cut(data_dir: Path, root: Path, *over: str, stop_at: int) -> tuple[C.Config, C.Config]:
    """The demo data prepared, then two runs of the same config: root/whole straight through, root/cut stopped at
    ``stop_at`` (saved as a preemption saves) and resumed by a second call, as a requeued job resumes. Returns
    their configs; compare their last checkpoints with assert_states_equal."""
    from t2v.train import REQUEUE_EXIT, train

    whole, cut = (tiny_config(data_dir, root / name, *over) for name in ("whole", "cut"))
    prepare(whole, n_train=8)
    assert train(whole) == 0
    assert train(cut, stop_at=stop_at) == REQUEUE_EXIT
    assert train(cut) == 0
    return whole, cut


def load(path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_states_equal(a: dict, b: dict, keys=("model", "ema")) -> None:
    """Weights, EMA, optimizer state and every RNG state are identical (torch.equal, not close)."""
    assert a["step"] == b["step"] and a["data"] == b["data"]
    ra, rb = a["rng"], b["rng"]
    assert torch.equal(ra["torch"], rb["torch"]) and torch.equal(ra["numpy"]["keys"], rb["numpy"]["keys"])
    assert ra["python"] == rb["python"] and ra["numpy"]["pos"] == rb["numpy"]["pos"]
    for k in keys:
        assert a[k].keys() == b[k].keys()
        for name in a[k]:
            assert torch.equal(a[k][name], b[k][name]), f"{k}.{name} differs"
    oa, ob = a["optimizer"]["state"], b["optimizer"]["state"]
    assert oa.keys() == ob.keys()
    for i in oa:
        for name in oa[i]:
            assert torch.equal(torch.as_tensor(oa[i][name]), torch.as_tensor(ob[i][name])), f"optimizer {i}.{name}"


def assert_close(a: dict, b: dict, keys=("model", "ema")) -> None:
    """Weights and EMA agree to float tolerance: what N ranks with batch b and one process with batch N x b reach."""
    for k in keys:
        for name in a[k]:
            torch.testing.assert_close(a[k][name], b[k][name], rtol=1e-4, atol=1e-5, msg=f"{k}.{name}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(data_dir, outdir, world: int, *args: str) -> list[subprocess.Popen]:
    """Start `world` ranks the way srun does: one process per task, rank and size in the environment."""
    cmd = [sys.executable, "-m", "t2v.train", "--config", str(REPO / "configs/tiny.yaml"),
           f"data.manifest={data_dir / 'train.jsonl'}", f"data.cache_dir={data_dir / 'cache'}",
           f"text.cache_dir={data_dir / 'cache'}", f"train.outdir={outdir}", *args]
    port = free_port()
    procs = []
    for rank in range(world):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    return procs


def finish(procs, timeout=300) -> list[tuple[int, str]]:
    return [(p.wait(timeout=timeout), p.stdout.read()) for p in procs]
