"""Training: `python -m t2v.train [--config FILE] [key=value ...]` (the baseline's env vars still work).

The loop reads top to bottom in `train()`. Three properties shape it:
- Resume is automatic and bit-exact: every random draw of a step (timesteps, noise, caption dropout, which
  clips, which caption) is a pure function of (seed, step), and the checkpoint holds model, EMA,
  optimizer, scaler and RNG states, so a run stopped at any step continues exactly as if never stopped.
- Signals only set a flag (saving inside a handler is fragile); at the next step boundary all ranks agree,
  rank 0 saves, and the process exits with REQUEUE_EXIT, which the job script turns into a requeue.
- The text encoder never runs here: caption embeddings come from the cache (`python -m t2v.text embed`).
"""
from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from t2v import checkpoint as ckpt
from t2v.checkpoint import rng_state, set_rng_state  # noqa: F401 (t2v.train.rng_state: tests, tools)
from t2v.checkpointer import (RESUME_MUST_MATCH, Checkpointer, TrainingError,  # noqa: F401 (names tests use here)
                              incompatible_changes)
from t2v import config
from t2v import distributed
from t2v import flops
from t2v import parallel
from t2v.data.cache import CacheError
from t2v.data.sources import trained_fps
from t2v.data.windows import Rate
from t2v.data.dataset import ClipDataset, StepSampler
from t2v.data.manifest import ManifestError, read_manifest
from t2v.data.video import VideoError
from t2v.device import DeviceError, no_deterministic_kernel, pick_device, set_deterministic
from t2v.files import no_space
from t2v.models import build_model, count_params, ema_copy, identity, set_null_caption
from t2v.objective import build_objective
from t2v import runlog
from t2v import tracking
from t2v.runlog import REQUEUE_EXIT, RunLog
from t2v.sample import generate, save_grid
from t2v.step import Cond, StepState, autocast, train_step
from t2v.space import build_space
from t2v.vae import VAEError
from t2v.text import EmbeddingCache, EmbeddingCacheError, TextEncoderError, encoder_key
from t2v.validate import load_val_set, val_loss

HANDLED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    """Set by SIGUSR1/SIGUSR2/SIGTERM. The handler does nothing else, so a second signal arriving while the
    checkpoint is being written only sets the flag again and cannot interrupt or corrupt the save."""

    def __init__(self):
        self.signame: str | None = None

    def __call__(self, signum, frame):
        self.signame = self.signame or signal.Signals(signum).name

    def install(self) -> None:
        for s in HANDLED_SIGNALS:
            signal.signal(s, self)


def _ignore_signals_in_worker(_worker_id: int) -> None:
    # Slurm signals the whole process group; a DataLoader worker killed by SIGTERM would crash the loop
    # before the main process could save. The main process alone decides when to stop.
    for s in HANDLED_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def pick_precision(cfg: config.Config, device: torch.device) -> str:
    if cfg.train.precision != "auto":
        return cfg.train.precision
    if device.type != "cuda":
        return "fp32"  # CPU autocast is slower than fp32 for convolutions and breaks bit-exact comparisons
    # fp16 needs a grad scaler, which sharded gradients (train.parallel=fsdp) do not have here; a bf16 base
    # (model.base_dtype) computes in bf16 whatever the card, slowly where it has no bf16 units
    fp16_ok = cfg.train.parallel != "fsdp" and cfg.model.base_dtype != "bf16"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16" if fp16_ok else "fp32"


def step_flops(model, cfg: config.Config, space, objective, device, precision: str, global_batch: int) -> int:
    """Model FLOPs of one optimizer step (t2v.flops: forward and backward of one clip of the run's shape, counted
    once, times the global batch), under the run's autocast so that it needs no more memory than a step's clip."""
    shape = space.sample_shape(1, cfg.data.frames, cfg.data.frame_size)  # 1 t c h w
    example = {"x": torch.zeros(shape, device=device), "text": torch.zeros(1, cfg.text.dim, device=device)}
    if config.uses_tokens(cfg):
        example["tokens"] = torch.zeros(1, cfg.text.max_tokens, cfg.text.dim, device=device)  # 1 l d
        example["token_mask"] = torch.ones(1, cfg.text.max_tokens, dtype=torch.bool, device=device)
    if cfg.model.fps_cond:
        example["fps"] = torch.full((1,), float(cfg.data.fps or 8), device=device)
    t = objective.model_time(objective.draw_times(torch.Generator(device=device).manual_seed(0), 1, device))
    with autocast(device, precision):
        return flops.train_flops_per_clip(model, example, t) * global_batch


def card_peak(cfg: config.Config, device: torch.device, precision: str) -> float | None:
    """TFLOP/s MFU is measured against: train.peak_tflops, else t2v.flops' table for this GPU (None: no MFU)."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops
    if device.type != "cuda":
        return None
    return flops.peak_tflops(torch.cuda.get_device_name(device), precision, torch.backends.cuda.matmul.allow_tf32)


def load_data(cfg: config.Config, log: RunLog, space):
    """Manifest -> clips, the caches ``space`` (t2v.space) reads of them, and the caption-embedding cache; fails
    with what to run if a cache is not built."""
    clips = read_manifest(cfg.data.manifest, cfg.data.video_root, skip_bad=cfg.data.skip_bad_lines)
    if not clips:
        raise TrainingError(f"{cfg.data.manifest}: no usable clips")
    caches = space.open_training_caches(cfg, clips, log)  # ClipDataset's cache=, latents= or windows=
    emb = EmbeddingCache.load(config.cache_dir(cfg, "text"), encoder_key(cfg.text))
    if config.uses_tokens(cfg) and len(emb) and not emb.has_tokens:
        needs = "model.cross_attention" if cfg.model.cross_attention else f"model.arch={cfg.model.arch}"
        raise TrainingError(f"{needs} needs per-token caption embeddings: set text.tokens=true and "
                            "rerun `python -m t2v.text embed` with the same arguments")
    missing = emb.missing(sorted({c for clip in clips for c in clip.captions}))
    if missing:
        raise TrainingError(
            f"{len(missing)} captions of {cfg.data.manifest} have no cached embedding (e.g. {missing[0]!r}).\n"
            "Run once: python -m t2v.text embed with this run's --config and key=value arguments (the training "
            "process never runs the text encoder)")
    return clips, caches, emb


def caption_tokens(emb: EmbeddingCache, captions, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached per-token embeddings for cross-attention: (b l d) and mask (b l)."""
    pairs = [emb.get_tokens(c) for c in captions]
    return (torch.stack([t for t, _ in pairs]).to(device, non_blocking=True),
            torch.stack([m for _, m in pairs]).to(device, non_blocking=True))


def preview(ema, cfg, emb, step, device, log, space=None, fps: float | None = None, write: bool = True) -> None:
    """A grid of the EMA's samples for train.sample_prompts. A sharded EMA samples on every rank (each block's
    weights are gathered from all of them); only ``write`` (rank 0) saves the grid."""
    prompts = [p for p in cfg.train.sample_prompts if p in emb]
    if not prompts:
        return
    text = torch.stack([emb.get(p) for p in prompts]).to(device)
    tokens, mask = caption_tokens(emb, prompts, device) if config.uses_tokens(cfg) else (None, None)
    videos = generate(ema, cfg, text, tokens=tokens, token_mask=mask, steps=cfg.train.sample_steps,
                      method=cfg.train.sample_method, guidance=cfg.train.guidance, seed=cfg.train.seed, device=device,
                      space=space, fps=fps)
    if not write:
        return
    path = runlog.preview_path(cfg.train.outdir, step)
    save_grid(videos, path, prompts)
    log.line(f"sample grid {path}")
    log.image("preview", path, step)


def peak_memory(device: torch.device) -> dict:
    """{"gpu_mem_gib": the most GPU memory this process has held for tensors so far} on CUDA, {} elsewhere."""
    return {"gpu_mem_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)} if device.type == "cuda" else {}


def log_val_loss(ema, objective, valset, step, device, log) -> None:
    losses = val_loss(ema, objective, valset, device)
    mean = sum(losses.values()) / len(losses)
    log.line(f"val step {step:06d} | " + " ".join(f"t{t} {v:.4f}" for t, v in losses.items()) + f" | mean {mean:.4f}")
    log.event(runlog.VAL, step, val_loss=mean, **{f"val_loss_t{t}": v for t, v in losses.items()})


def train(cfg: config.Config, stop_at: int | None = None) -> int:
    """Train to cfg.train.steps, resuming from OUTDIR if it holds checkpoints. Returns the exit code:
    0 when all steps are done, REQUEUE_EXIT when a signal (or `stop_at`, for tests) stopped it after saving."""
    # --- process, device, precision ---------------------------------------------------------------------
    set_deterministic(cfg.train.deterministic)  # before the first CUDA kernel: cuBLAS reads its setting once
    device = pick_device(cfg.train.device, int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0))))
    sharded = cfg.train.parallel == "fsdp"  # FSDP shards over a group even of one rank: the same code path
    dist = distributed.init(device.type, cfg.train.dist_timeout_s, cfg.train.outdir, alone=sharded)
    precision = pick_precision(cfg, device)
    outdir = Path(cfg.train.outdir)
    restart = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    log = RunLog(outdir, enabled=dist.is_main, restart=restart)
    stop = StopFlag()
    stop.install()
    log.line(f"{runlog.OUT_PREFIX}{outdir} | Device: {device}")
    nodes = distributed.rank_nodes(dist)  # every (re)start: a requeued job may land on other nodes
    if dist.enabled:
        log.line(f"ranks: {dist.world_size} ({distributed.describe_nodes(nodes)}) | rendezvous "
                 f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']} | collective timeout {cfg.train.dist_timeout_s:g} s")
    elif sharded:
        log.line("train.parallel=fsdp on one process: one shard, the code path of many ranks and their checkpoint "
                 "folders, but no memory saved (that takes several GPUs)")
    space = build_space(cfg, device)  # pixels, or a frozen VAE's latents (loaded once, here)

    # --- resume state (before anything that depends on the global batch) -------------------------------
    checkpointer = Checkpointer(outdir, cfg, log, dist)
    state, resumed_from = checkpointer.latest()
    if cfg.train.tensorboard and dist.is_main:  # the records metrics.jsonl gets, also as TensorBoard events
        log.add_sink(tracking.TensorBoard(outdir / "tensorboard", None if state is None else int(state["step"]),
                                          config.to_yaml(cfg)))
    if cfg.train.wandb != "off" and dist.is_main:  # the same records, as a W&B run every requeue continues
        log.add_sink(tracking.WandB(outdir, cfg.train.wandb, cfg.train.wandb_project,
                                    None if state is None else int(state["step"]), config.to_dict(cfg), log))
    accum = cfg.train.grad_accum
    asked = cfg.train.batch_size * dist.world_size * accum  # BS x ranks x micro-batches per optimizer step
    global_batch = checkpointer.check_resume(state, resumed_from, asked, space)
    per_rank_batch = global_batch // dist.world_size
    if per_rank_batch % accum:
        raise TrainingError(f"the per-rank batch {per_rank_batch} (global batch {global_batch} / {dist.world_size} ranks) "
                            f"does not split into train.grad_accum={accum} micro-batches; choose a divisor")

    # --- data: manifest -> cached clips + cached caption embeddings -------------------------------------
    clips, caches, emb = load_data(cfg, log, space)
    dataset = ClipDataset(clips, emb, cfg.data.frames, cfg.data.frame_size, cfg.train.seed, sampling=cfg.data.sampling,
                          window=cfg.data.window, strides=cfg.data.strides, pad=cfg.data.short_clips == "pad",
                          rate=Rate.of(cfg.data), **caches)
    fps = trained_fps(cfg, caches.get("windows"))
    valset = None
    evaluates = dist.is_main or sharded  # a sharded EMA runs on every rank at once (t2v.parallel)
    if evaluates and cfg.train.val_every:
        valset, why_not = load_val_set(cfg, emb, space)
        log.line(why_not or f"validation loss every {cfg.train.val_every} steps: {valset.videos.shape[0]} clips of "
                            f"{valset.manifest} at t = {', '.join(map(str, valset.timesteps))}")

    # --- model, EMA, optimizer, diffusion schedule ------------------------------------------------------
    torch.manual_seed(cfg.train.seed)
    np.random.seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    model = build_model(cfg, space.channels).to(device)
    set_null_caption(model, emb)  # a pretrained family drops a caption to the empty one's embedding (t2v.models)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last_3d)
    ema = ema_copy(model)  # what trains, averaged; a pretrained model's frozen base is shared, not copied
    objective = build_objective(cfg.diffusion, device)  # DDPM or rectified flow: what x_t and the target are
    flops_per_step = step_flops(model, cfg, space, objective, device, precision, global_batch)  # before any wrapper
    peak = card_peak(cfg, device, precision)
    if sharded:  # each rank keeps 1/N of every weight, gradient, Adam state and EMA weight from here on
        parallel.shard(model, precision, device)
        parallel.shard(ema, precision, device)
    # fused: one kernel for all parameters (measured before -> after in bench/results/latest.md); only what trains
    # has optimizer state (a LoRA: the adapter's weights)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay, betas=(0.9, 0.999), fused=True)
    scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16"))

    checkpointer.attach(model, ema, opt, scaler, global_batch,
                        data={**space.checkpoint_data(), "fps": fps, **identity(model)})
    if state is not None:
        start_step = checkpointer.load_state_dict(state, resumed_from, restart, nodes)
        del state
    else:
        start_step = 0
        log.event(runlog.START, 0, world_size=dist.world_size, nodes=nodes)
    if dist.is_main:
        config.save_config(cfg, outdir / "config.yaml")
        if start_step == 0:
            trains = count_params(model, trainable=True)
            what = (f"{cfg.model.arch} from {cfg.model.pretrained}: {count_params(model) / 1e6:.2f}M parameters, "
                    f"{trains:,} trained ({cfg.train.finetune})" if cfg.model.pretrained else
                    f"{cfg.model.size} {cfg.model.arch}: {count_params(model) / 1e6:.2f}M parameters")
            log.line(f"model {what} | "
                     f"{cfg.diffusion.objective} | precision {precision} | {cfg.train.parallel} | "
                     f"global batch {global_batch} = {dist.world_size} x {per_rank_batch}"
                     f"{f' ({accum} micro-batches of {per_rank_batch // accum})' if accum > 1 else ''} | "
                     f"lr {cfg.train.lr:g} | {flops_per_step / 1e12:.4g} model TFLOP a step"
                     f"{f' (MFU against {peak:g} TFLOP/s a rank)' if peak else ''}")
    steps = cfg.train.steps
    if start_step >= steps:
        log.line(f"nothing to do: {outdir} is already at step {start_step} of {steps}")
        distributed.shutdown(dist, outdir)
        log.close()
        return 0

    # FSDP's model gathers and reduces by itself; DDP wraps the model
    net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if dist.enabled and not sharded \
        else model
    if cfg.train.compile:
        net = torch.compile(net)
    sampler = StepSampler(len(clips), global_batch, cfg.train.seed, start_step, dist.rank, dist.world_size, steps)
    # Its own generator: the DataLoader draws worker seeds when an iterator starts, which would otherwise move
    # the global RNG once per resume and make a resumed run's RNG state differ from an uninterrupted one.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                                         worker_init_fn=_ignore_signals_in_worker, pin_memory=device.type == "cuda",
                                         generator=torch.Generator().manual_seed(cfg.train.seed))
    step_state = StepState(net, model, ema, opt, scaler, objective, cfg.diffusion, cfg.train, precision, device, dist,
                           global_batch, grad_accum=accum)

    # --- the loop ---------------------------------------------------------------------------------------
    model.train()
    nan_steps = bad_clips = 0
    last_loss = float("nan")
    grad_norm = torch.tensor(float("nan"))
    window_start, window_steps = time.time(), 0
    for step, batch in zip(range(start_step, steps), loader):
        bad_clips += int(batch["bad"].sum())
        if bad_clips > cfg.data.max_bad_clips:
            raise TrainingError(f"{bad_clips} corrupt clips skipped (cap data.max_bad_clips="
                                f"{cfg.data.max_bad_clips}); run `python -m t2v.data check {cfg.data.manifest}`")
        x0 = space.model_input(batch, cfg.train.seed, step, dist.rank, global_batch, device)  # b t c h w
        text = batch["text"].to(device, non_blocking=True)  # b d
        tokens, token_mask = (caption_tokens(emb, batch["caption"], device) if config.uses_tokens(cfg)
                              else (None, None))  # b l d, b l
        if cfg.train.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last_3d)
        clip_fps = batch["fps"].to(device) if cfg.model.fps_cond else None  # b: the rate of each window
        result = train_step(step_state, step, x0, Cond(text, tokens, token_mask, clip_fps), stop.signame is not None)
        loss_value, stop_now = result.loss, result.stop
        if result.grad_norm is None:  # non-finite: the update was skipped on every rank, the step consumed
            nan_steps += 1
            log.warn(f"non-finite loss at step {step + 1}; update skipped ({nan_steps}/{cfg.train.max_nan_steps})")
            if nan_steps > cfg.train.max_nan_steps:
                raise TrainingError(f"{nan_steps} non-finite losses (cap train.max_nan_steps="
                                    f"{cfg.train.max_nan_steps}); lower train.lr "
                                    "or use train.precision=fp32")
        else:
            grad_norm, last_loss = result.grad_norm, loss_value

        done = step + 1
        window_steps += 1
        if done % cfg.train.log_every == 0 or done == steps:
            elapsed = time.time() - window_start
            log.line(f"step {done:06d} | loss {loss_value:.4f}")
            utilisation = flops.mfu(flops_per_step, window_steps, elapsed, dist.world_size, peak)
            log.metrics(step=done, loss=loss_value, lr=opt.param_groups[0]["lr"], grad_norm=float(grad_norm),
                        clips_per_s=window_steps * global_batch / max(elapsed, 1e-9),
                        step_time=elapsed / window_steps, world_size=dist.world_size, **peak_memory(device),
                        **({} if utilisation is None else {"mfu": round(utilisation, 4)}))
            window_start, window_steps = time.time(), 0
        saved = checkpointer.due(done)
        if saved:
            checkpointer.save(done, last_loss)
        if valset is not None and (done % cfg.train.val_every == 0 or done == steps):
            log_val_loss(ema, objective, valset, done, device, log)
            parallel.reshard(ema)
        if evaluates and cfg.train.sample_every and done % cfg.train.sample_every == 0:
            try:
                preview(ema, cfg, emb, done, device, log, space, fps, write=dist.is_main)
                parallel.reshard(ema)
            except Exception as e:  # a preview is a picture: it must never end a long run, unless the disk is full
                if no_space(e):
                    raise
                log.warn(f"preview at step {done} failed and was skipped: {type(e).__name__}: {e}")
                log.event(runlog.PREVIEW_FAILED, done, error=f"{type(e).__name__}: {e}")
        if (stop_now or done == stop_at) and done < steps:
            log.line(f"signal {stop.signame or 'stop_at'} at step {done}: {runlog.REQUEUE_MARK}")
            if not saved:
                checkpointer.save(done, last_loss)  # rank 0 writes a file; with FSDP every rank its shards
            log.event(runlog.PREEMPT, done, signal=stop.signame or "stop_at")
            distributed.barrier(dist)
            distributed.shutdown(dist, outdir)
            log.close()
            return REQUEUE_EXIT
    log.event(runlog.DONE, steps)
    log.line(f"{runlog.DONE_PREFIX}{steps} steps in {outdir}")
    distributed.barrier(dist)
    distributed.shutdown(dist, outdir)
    log.close()
    return 0


def _out_of_space(cfg, e: BaseException) -> int:
    """What a run that found no room to write says (one line, stderr, train.log and an ``error`` event) before it
    exits with NO_SPACE_EXIT, which the job script does not requeue: a requeue would meet the same full disk."""
    err = no_space(e)
    saved = ckpt.list_checkpoints(cfg.train.outdir) if cfg is not None else []
    kept = (f"nothing saved was lost: the newest checkpoint is {saved[-1][1]}" if saved else
            "no checkpoint was saved yet")
    msg = (f"{err}; {kept}. Free space (or move the run folder and set OUTDIR to it), then submit the same command "
           "again: it resumes from there")
    print(f"error: {msg}", file=sys.stderr)
    if cfg is not None and distributed.detect().is_main:
        runlog.log_error(cfg.train.outdir, msg, reason="no_space")
    return runlog.NO_SPACE_EXIT


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m t2v.train", description=__doc__.split("\n")[0])
    config.add_config_args(p)
    args = p.parse_args(argv)
    cfg = None
    try:
        cfg = config.load_config(args.config, args.overrides)
        return train(cfg)
    except (config.ConfigError, TrainingError, ckpt.CheckpointError, ManifestError, VideoError, DeviceError,
            EmbeddingCacheError, TextEncoderError, VAEError, CacheError) as e:
        print(f"error: {e}", file=sys.stderr)
        if cfg is not None and distributed.detect().is_main:
            runlog.log_error(cfg.train.outdir, str(e))
        return runlog.USAGE_EXIT
    except RuntimeError as e:  # ranks that could not meet, or a collective that timed out or lost a peer
        if no_space(e):
            return _out_of_space(cfg, e)
        if (op := no_deterministic_kernel(e)) is not None:
            msg = (f"train.deterministic=true, but {op} has no deterministic kernel on this device; train without "
                   "train.deterministic (a resume then restores the state exactly, but kernels may sum in another "
                   "order), or change the setting that uses it")
            print(f"error: {msg}", file=sys.stderr)
            if distributed.detect().is_main:
                runlog.log_error(cfg.train.outdir, msg)
            return runlog.USAGE_EXIT
        lost = distributed.lost_ranks(e, distributed.detect(), cfg.train.dist_timeout_s) if cfg else None
        if lost is None:
            raise
        print(f"error: {lost}", file=sys.stderr)
        if distributed.detect().is_main:
            runlog.log_error(cfg.train.outdir, str(lost))
        return 1
    except OSError as e:  # a write found no room (checkpoint, metrics, TensorBoard, preview): one line, not a trace
        if not no_space(e):
            raise
        return _out_of_space(cfg, e)
    finally:
        # Python puts the default handlers back while it shuts down, so a late USR1 (a time-limit warning)
        # would kill a process that has already saved or finished. Ignored signals stay ignored.
        for s in HANDLED_SIGNALS:
            signal.signal(s, signal.SIG_IGN)


if __name__ == "__main__":
    distributed.exit_process(main())
