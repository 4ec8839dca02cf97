"""Section ``sharded``: what a sharded checkpoint (train.parallel=fsdp, t2v.sharded) costs against a single file.

The same training state (a ~50 M-parameter UNet, its EMA, AdamW moments after one step, RNG, config) is saved and
loaded both ways through the code the loop runs: ``Checkpointer.save`` of the plain model (one atomic file) and of
the same model sharded by FSDP2 over a one-rank group (a DCP folder: shards, ``.metadata``, ``train_state.pt``,
renamed into place); loading is ``t2v.checkpoint.load_checkpoint`` + ``load_state_dict`` against what a resume of
a sharded run does (``load_resume_state``: the folder's check and its train state, then every rank's shards).
Alternating rounds, median; every save goes to a fresh step, as in training. One rank on CPU: the figures are the
format's own cost (DCP's planning and per-tensor files against one torch.save), not a parallel file system's.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from bench.common import Row, SectionResult, alternate, fmt_s, log, median, per_round_ratios
from bench.preempt import training_state
from t2v import checkpoint as ckpt
from t2v import config
from t2v import distributed
from t2v import parallel
from t2v.checkpointer import Checkpointer
from t2v.runlog import RunLog


def overrides(quick: bool, outdir: Path) -> list[str]:
    model = ["model.size=tiny", "text.dim=64"] if quick else ["model.size=large", "model.base_channels=144",
                                                             "text.dim=512"]
    return [*model, "text.encoder=hash", "train.device=cpu", "train.keep_last=2", f"train.outdir={outdir}"]


def bench_sharded(args) -> SectionResult:
    res = SectionResult("sharded")
    workdir = Path(args.workdir)
    rounds = 1 if args.quick else max(3, args.repeats)
    dist = distributed.init("cpu", 600.0, None, alone=True)  # a one-rank group: FSDP's code path on one process
    try:
        file_dir, folder_dir = workdir / "sharded_file", workdir / "sharded_folder"
        cfg = config.load_config(None, overrides(args.quick, file_dir), env={})
        model, ema, opt, scaler = training_state(cfg)
        params = sum(p.numel() for p in model.parameters())
        # the same state sharded: the plain model's weights, its optimizer state carried over by name
        s_model, s_ema = parallel.shard(copy.deepcopy(model), "fp32", torch.device("cpu")), \
            parallel.shard(copy.deepcopy(ema), "fp32", torch.device("cpu"))
        s_opt = torch.optim.AdamW(s_model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        to_file = Checkpointer(file_dir, cfg, RunLog(file_dir, enabled=False), dist)
        to_file.attach(model, ema, opt, scaler, cfg.train.batch_size)
        to_folder = Checkpointer(folder_dir, config.load_config(None, overrides(args.quick, folder_dir), env={}),
                                 RunLog(folder_dir, enabled=False), dist)
        to_folder.attach(s_model, s_ema, s_opt, scaler, cfg.train.batch_size)
        saved = to_file.save(1, 0.5)
        state = ckpt.load_checkpoint(saved)
        to_folder.load_state_dict(state, saved)  # a file into a sharded model: what a resume of it does
        step = iter(range(2, 10**6))

        def save(which):
            return lambda: which.save(next(step), 0.5)

        saves = alternate({"file": save(to_file), "sharded": save(to_folder)}, rounds, warmup=1,
                          label="sharded save")
        newest_file, newest_folder = ckpt.list_checkpoints(file_dir)[-1][1], ckpt.list_checkpoints(folder_dir)[-1][1]

        def load_file():
            to_file.load_state_dict(ckpt.load_checkpoint(newest_file), newest_file)

        def load_folder():
            to_folder.load_state_dict(ckpt.load_resume_state(newest_folder), newest_folder)

        loads = alternate({"file": load_file, "sharded": load_folder}, rounds, warmup=1, label="sharded load")
        sizes = {"file": ckpt.size_of(newest_file), "sharded": ckpt.size_of(newest_folder)}
        # what was loaded is what was saved: the sharded model now holds the file's weights
        for name, p in model.state_dict().items():
            assert torch.equal(p, parallel.local(s_model.state_dict()[name])), name
    finally:
        distributed.shutdown(dist)
    size = "tiny" if args.quick else f"{params / 1e6:.0f}M-parameter UNet"
    res.data.update({"config": overrides(args.quick, Path("OUTDIR")), "params": params, "save_s": saves,
                     "load_s": loads, "bytes": sizes, "rounds": rounds})
    log(f"sharded: save file {fmt_s(median(saves['file']))}, folder {fmt_s(median(saves['sharded']))}; load file "
        f"{fmt_s(median(loads['file']))}, folder {fmt_s(median(loads['sharded']))}")
    for what, t in (("save", saves), ("load", loads)):
        ratio = median(t["sharded"]) / median(t["file"])
        res.rows.append(Row(f"Sharded checkpoint {what} (DCP folder, 1 rank) vs one file, {size}, model + EMA + "
                            f"AdamW ({sizes['sharded'] / 1e6:.0f} MB vs {sizes['file'] / 1e6:.0f} MB)",
                            f"{fmt_s(median(t['sharded']))} vs {fmt_s(median(t['file']))} ({ratio:.2f}x)", "-", None,
                            f"per-round sharded/file {', '.join(f'{r:.2f}' for r in per_round_ratios(t['sharded'], t['file']))}"))
    return res
