"""The training state and its checkpoints, in one place: what a checkpoint holds (model, EMA, optimizer, grad
scaler, every RNG, the data position, the config), what a resume must match, when to save and how many to keep.

    ckpt = Checkpointer(outdir, cfg, log, dist)
    state, path = ckpt.latest()                        # rank 0 picks, every rank loads that file
    global_batch = ckpt.check_resume(state, path, asked, space)     # space: t2v.space
    ckpt.attach(model, ema, opt, scaler, global_batch, data={**space.checkpoint_data(), "fps": fps})
    start = ckpt.load_state_dict(state, path) if state else 0
    ...
    if ckpt.due(step): ckpt.save(step, last_loss)

t2v.checkpoint does the file I/O (atomic save, verified load, quarantine, keep-k), t2v.sharded a sharded folder's
(train.parallel=fsdp: every rank saves its shards); t2v.train is the loop. Either kind resumes into either kind of
run, at any world size that divides the global batch.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from t2v import checkpoint as ckpt_io
from t2v import config
from t2v import distributed
from t2v import parallel
from t2v import runlog
from t2v import sharded
from t2v.checkpoint import rng_state, set_rng_state
from t2v.config_checks import space_facts
from t2v.files import free_bytes, human_bytes
from t2v.models import check_base
from t2v.runlog import TrainingError


# What a checkpoint's weights were trained for: resuming with another value would continue silently from
# incompatible weights (another text space, noise schedule, target or clip shape).
# The temporal settings are here too: a run that changed how far apart its frames are would mix two kinds of motion.
RESUME_MUST_MATCH = ("text.encoder", "text.name", "text.dim", "diffusion.objective", "diffusion.prediction",
                     "diffusion.schedule", "diffusion.timesteps", "diffusion.shift", "diffusion.beta_start",
                     "diffusion.beta_end", "data.frames", "data.size", "data.width", "vae.name", "vae.subfolder",
                     "data.sampling", "data.window", "data.fps", "data.frame_interval", "data.strides",
                     "data.max_seconds", "train.finetune", "train.lora_rank", "train.lora_alpha", "train.lora_targets")

# model settings that change how the step computes, not what the weights are: a resume may change them freely
HOW_NOT_WHAT = ("model.checkpointing", "model.base_dtype")


def incompatible_changes(saved: config.Config, cfg: config.Config, channels: int = 3) -> list[str]:
    """``key: saved -> now`` for every model setting and RESUME_MUST_MATCH key that differs, except the keys
    ``train.allow_changes`` names (a deliberate change, e.g. fine-tuning at another SIZE). model.in_channels is
    compared as resolved (0: the space's ``channels``): older latent checkpoints hold the VAE's channels there;
    data.width too (0 for any square frame), so a square run's checkpoints from before data.width resume and a
    square run's change of data.size is that key alone."""
    a, b = config.to_dict(saved), config.to_dict(cfg)
    for d in (a, b):
        d["model"]["in_channels"] = d["model"]["in_channels"] or channels
        d["data"]["width"] = 0 if d["data"].get("width") in (None, 0, d["data"]["size"]) else d["data"]["width"]
    keys = [f"model.{k}" for k in a["model"] if f"model.{k}" not in HOW_NOT_WHAT] + list(RESUME_MUST_MATCH)
    unused = {"text.name"} if cfg.text.encoder not in ("clip", "umt5", "sd_clip") else set()  # only these read it
    if not (space_facts(saved).vae or space_facts(cfg).vae):
        unused |= {"vae.name", "vae.subfolder"}  # neither space has a VAE
    keys = [k for k in keys if k not in cfg.train.allow_changes and k not in unused]
    get = lambda d, key: d[key.split(".")[0]][key.split(".")[1]]  # noqa: E731
    return [f"{k}: {get(a, k)!r} -> {get(b, k)!r}" for k in keys if get(a, k) != get(b, k)]


@dataclass
class Checkpointer:
    outdir: Path
    cfg: config.Config
    log: runlog.RunLog
    dist: distributed.Dist = field(default_factory=distributed.Dist)
    # the state it saves, from attach()
    model: torch.nn.Module | None = None
    ema: torch.nn.Module | None = None
    opt: torch.optim.Optimizer | None = None
    scaler: torch.amp.GradScaler | None = None
    global_batch: int = 0
    data: dict = field(default_factory=dict)  # what the run's data adds to the data section: VAE identity, fps
    last_size: int = 0  # bytes of the newest checkpoint, for the warning before the disk fills
    space_warned: bool = False

    # --- resume ---------------------------------------------------------------------------------------------
    def latest(self) -> tuple[dict | None, Path | None]:
        """The newest valid checkpoint and its path (None, None for a fresh run). Rank 0 alone picks it
        (quarantining a corrupt newest one); the others load the file it picked, so no rank can resume from
        another step because of its own passing read error."""
        if self.dist.is_main:
            ckpt_io.clean_temp_files(self.outdir)
        # of a sharded folder only the train state: each rank reads its own shards in load_state_dict
        load = ckpt_io.load_resume_state
        state, path = ckpt_io.load_latest(self.outdir, load) if self.dist.is_main else (None, None)
        path = distributed.broadcast_object(path, self.dist)
        if not self.dist.is_main and path is not None:
            state = load(path)
        return state, path

    def check_resume(self, state: dict | None, path: Path | None, asked: int, space) -> int:
        """The global batch the run goes on with (the checkpoint's, so its data order is kept), after refusing a
        resume whose settings differ in what the weights were trained for."""
        if state is None:
            return asked
        cfg, world = self.cfg, self.dist.world_size
        changed = incompatible_changes(config.from_dict(state["config"]), cfg, space.channels)
        if changed:
            raise TrainingError(f"{path}: this run's settings differ from the checkpoint's in what its weights "
                                f"were trained for ({'; '.join(changed)}); use a new OUTDIR (train.outdir), the "
                                "checkpoint's values, or name the keys you mean to change in train.allow_changes=KEY,KEY")
        if state["data"].get("vae") != space.identity and "vae.name" not in cfg.train.allow_changes:
            raise TrainingError(f"{path}: trained on the latents of another VAE (its weights or config differ "
                                f"from {cfg.vae.name}'s now); use the same VAE, a new OUTDIR, or "
                                "train.allow_changes=vae.name")
        global_batch = state["data"]["global_batch"]
        if global_batch != asked:
            accum = cfg.train.grad_accum
            self.log.line(f"global batch {global_batch} kept from the checkpoint (train.batch_size="
                          f"{cfg.train.batch_size} x {world} ranks{f' x {accum} micro-batches' if accum > 1 else ''} "
                          f"asks for {asked}): a resumed run keeps its data order")
        if global_batch % world:
            was = state["data"].get("world_size", 1)
            raise TrainingError(f"{path}: saved on {was} rank{'s' * (was != 1)} with global batch {global_batch}, "
                                f"which {world} ranks cannot split evenly; resume on a world size that divides "
                                f"{global_batch} (the global batch is kept so that the data order is)")
        return global_batch

    def attach(self, model, ema, opt, scaler, global_batch: int, data: dict | None = None) -> None:
        """The objects whose state a checkpoint holds (the un-wrapped model: DDP and compile wrap the same
        parameters; a pretrained model's state_dict is what trains, and data["base"] names the rest)."""
        self.model, self.ema, self.opt, self.scaler = model, ema, opt, scaler
        self.global_batch, self.data = global_batch, dict(data or {})

    def load_state_dict(self, state: dict, path: Path, restart: int = 0, nodes: list[str] | None = None) -> int:
        """Model, EMA, optimizer, scaler and RNG back as saved; returns the step to go on from. ``nodes`` (each
        rank's node) goes into the resume record of metrics.jsonl."""
        changed_base = check_base(state["data"], self.model, path)
        if changed_base:
            raise TrainingError(changed_base)
        try:
            self._load_weights(state, path)
        except (RuntimeError, KeyError) as e:  # only reachable through train.allow_changes=model.<key>
            lines = str(e).splitlines()
            raise TrainingError(f"{path}: its weights do not fit this model "
                                f"({lines[1].strip() if len(lines) > 1 else e})") from None
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        # a sharded save holds every rank's RNG; a rank the saving run did not have takes rank 0's
        rng = state.get("rng_ranks", {}).get(f"rank{self.dist.rank}", state["rng"])
        set_rng_state(rng, next(self.model.parameters()).device)
        step = int(state["step"])
        self.log.line(f"{runlog.RESUMED_PREFIX}{path} at step {step} (restart {restart})")
        world = self.dist.world_size
        if state["data"].get("world_size", 1) != world:
            self.log.line(f"world size {state['data'].get('world_size', 1)} -> {world}: global batch "
                          f"{self.global_batch} kept, {self.global_batch // world} per rank; the same clips, noise "
                          "and timesteps as before, but from here the trajectory differs from an uninterrupted run by "
                          "the order of float sums over ranks (not bit-exact)")
        self.log.event(runlog.RESUME, step, path=str(path), world_size=world, **({"nodes": nodes} if nodes else {}))
        return step

    def _load_weights(self, state: dict, path: Path) -> None:
        """Model, EMA and optimizer from a sharded folder (every rank its part) or a file (whole on every rank; a
        sharded model keeps its own shards of it)."""
        if path.is_dir():
            sharded.load_into(path, self.model, self.ema, self.opt)
        elif parallel.is_sharded(self.model):
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            whole = StateDictOptions(full_state_dict=True)
            set_model_state_dict(self.model, state["model"], options=whole)
            set_model_state_dict(self.ema, state["ema"], options=whole)
            names = [n for n, p in self.model.named_parameters() if p.requires_grad]  # the optimizer's order
            set_optimizer_state_dict(self.model, self.opt, sharded.optimizer_by_name(state["optimizer"], names),
                                     options=whole)
        else:
            self.model.load_state_dict(state["model"])
            self.ema.load_state_dict(state["ema"])
            self.opt.load_state_dict(state["optimizer"])

    # --- save -----------------------------------------------------------------------------------------------
    def state_dict(self, step: int, last_loss: float) -> dict[str, Any]:
        """Everything a run needs to go on at ``step`` exactly as if it had never stopped (a single file's)."""
        return {**self.train_state(step, last_loss), "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.opt.state_dict()}

    def train_state(self, step: int, last_loss: float, rng_ranks: list | None = None) -> dict[str, Any]:
        """All of it but the weights and the optimizer state: a sharded save's train_state.pt."""
        cfg = self.cfg
        return {
            "format": ckpt_io.FORMAT_VERSION,
            "step": step,
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "config": config.to_dict(cfg),
            "rng": rng_state(next(self.model.parameters()).device),
            "data": {"position": step * self.global_batch, "global_batch": self.global_batch, "seed": cfg.train.seed,
                     "world_size": self.dist.world_size, "grad_accum": cfg.train.grad_accum, **self.data},
            "metrics": {"loss": last_loss},
            "time": time.time(),
            # one key a rank: each draws from its own generators (one key for all would keep one rank's)
            **({"rng_ranks": {f"rank{r}": s for r, s in enumerate(rng_ranks)}} if rng_ranks else {}),
        }

    def _check_room(self) -> None:
        """Warn once, while there is still time to act, when the file system of OUTDIR has room for fewer than two
        more checkpoints of the last one's size (a save needs a whole one free beside those it keeps)."""
        if self.space_warned:
            return
        if not self.last_size and (saved := ckpt_io.list_checkpoints(self.outdir)):
            self.last_size = ckpt_io.size_of(saved[-1][1])
        free = free_bytes(self.outdir)
        if self.last_size and free is not None and free < 2 * self.last_size:
            self.space_warned = True
            self.log.warn(f"{human_bytes(free)} free on the file system of {self.outdir}, and a checkpoint takes "
                          f"{human_bytes(self.last_size)}: the next saves may not fit. Free space, or move the run "
                          "folder and resubmit with OUTDIR set to it (a quota may leave less than this)")

    def due(self, done: int) -> bool:
        """A checkpoint every train.ckpt_every steps and at the last one."""
        return done % self.cfg.train.ckpt_every == 0 or done == self.cfg.train.steps

    def save(self, step: int, last_loss: float) -> Path | None:
        """Rank 0 writes the checkpoint (atomically) and keeps the newest train.keep_last; the baseline's
        `saved OUTDIR/ckpt_NNNNNN.pt` line and a checkpoint event. Other ranks return None. A sharded model's
        checkpoint is a folder every rank writes into (every rank must call this at the same step)."""
        if parallel.is_sharded(self.model):
            rngs = distributed.gather_object(rng_state(next(self.model.parameters()).device), self.dist)
            if self.dist.is_main:
                self._check_room()
            path = sharded.save(ckpt_io.ckpt_path(self.outdir, step).with_suffix(""), self.model, self.ema, self.opt,
                                self.train_state(step, last_loss, rngs) if self.dist.is_main else None,
                                self.dist.is_main)
            if not self.dist.is_main:
                return None
        elif not self.dist.is_main:
            return None
        else:
            self._check_room()
            path = ckpt_io.save_checkpoint(self.state_dict(step, last_loss), ckpt_io.ckpt_path(self.outdir, step))
        self.last_size = ckpt_io.size_of(path)
        ckpt_io.prune(self.outdir, self.cfg.train.keep_last)
        self.log.line(f"saved {path}")
        self.log.event(runlog.CHECKPOINT, step, path=str(path))
        return path
