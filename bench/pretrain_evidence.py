"""Does starting from weights pay? The field's own experiment, image -> video, on the demo and on CPU:
`python -m bench.pretrain_evidence [--variants scratch,full,lora,motion] [--seeds 0,1,2] [--jobs 2] [--table]`
(`--results DIR` keeps a longer experiment's files apart: bench/results/pretrain_2000 holds the 2,000-step runs;
`--set KEY=VALUE`, repeatable, changes a setting of every fine-tune, not of the image model's pretraining:
bench/results/pretrain_shift8 holds `--set diffusion.shift=8`).

1. Pretrain an image model: a small Stable Diffusion-shaped UNet2D (diffusers' UNet2DConditionModel, on pixels so
   that the demo judge reads its samples) on single frames of the demo clips, captioned by colour and shape only
   ("a red circle": no frame of a still image says where it moves), with AnimateDiff's objective (DDPM predicting
   the noise on linear betas 0.00085 -> 0.012). A plain loop: this model stands for someone else's pretraining, as
   Stable Diffusion 1.5 does for AnimateDiff. It is saved with save_pretrained in an SD repository's layout (unet/).
2. Fine-tune it on the demo videos through t2v.train, as a user would (model.arch=animatediff, model.pretrained=
   that folder, a fresh adapter whose motion modules start at zero): train.finetune=motion, lora and full, against
   `scratch`: the same network from random weights (a UNet2D of the same config, seeded by the run's seed), full.
3. Judge the EMA weights every --eval-every steps on all 48 demo prompts (t2v.demo_eval) and read the validation
   loss at fixed timesteps, as bench/recipe_sweep.py does; `--table` prints docs/finetune.md's table from the
   results (--results, bench/results/pretrain/<variant>-seed<N>.json by default).

Everything but what trains is the same in all four: the network, objective, data, batch, rate, EMA, steps and the
judge's sampler. Each run is its own process with OMP_NUM_THREADS=--threads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench import recipe_sweep as sweep  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "pretrain"
TEXT_DIM = 64
# the demo (configs/demo.yaml) with AnimateDiff's network, objective and captions: the demo's own network options
# are fixed by the pretrained weights (model.*), and its flow settings do not apply to DDPM
COMMON = ["model.arch=animatediff", "model.motion_adapter=", "model.space=pixel", "model.base_channels=0",
          "model.patch=0", "model.coords=false", "model.temporal_attention=false", "model.downsample_time=false",
          "diffusion.objective=ddpm", "diffusion.schedule=linear", "diffusion.beta_start=0.00085",
          "diffusion.beta_end=0.012", "diffusion.prediction=eps", "diffusion.shift=1", "diffusion.logit_mean=0",
          "diffusion.logit_std=1", "text.tokens=true", f"text.dim={TEXT_DIM}", "text.max_tokens=12",
          "train.lr=1e-3", "train.batch_size=8", "train.guidance=5", "train.sample_steps=10"]
VARIANTS = {"scratch": ["train.finetune=full"], "full": ["train.finetune=full"], "lora": ["train.finetune=lora",
            "train.lora_rank=8"], "motion": ["train.finetune=motion"]}
STEPS, EVAL_EVERY = 400, 200
PRETRAIN_STEPS, PRETRAIN_BATCH = 1000, 32


def unet2d(seed: int):
    """The image network: two levels (16x16 with cross-attention, 8x8), 16 and 32 channels."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TEXT_DIM,
                                attention_head_dim=8, norm_num_groups=8)


def base_config(folder: Path, overrides=()):
    from t2v import config

    return config.load_config(REPO / "configs" / "demo.yaml", [*COMMON, f"model.pretrained={folder}", *overrides],
                              env={})


def image_caption(clip_caption: str) -> str:
    """'a red circle moving left' -> 'a red circle': what a still frame shows."""
    from t2v.data.demo import COLORS, SHAPES

    words = clip_caption.split()
    return f"a {next(w for w in words if w in COLORS)} {next(w for w in words if w in SHAPES)}"


def pretrain(folder: Path, steps: int = PRETRAIN_STEPS, batch: int = PRETRAIN_BATCH, seed: int = 0) -> dict:
    """Train the image model on single demo frames (10% of captions dropped to "", for guidance), save it to
    folder/unet; returns its log."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from t2v import config
    from t2v.data.cache import open_cache
    from t2v.data.manifest import read_manifest
    from t2v.data.video import to_model
    from t2v.objective import build_objective
    from t2v.text import EmbeddingCache, embed_captions, encoder_key

    cfg = base_config(folder)
    sweep.prepare(cfg)
    clips = read_manifest(cfg.data.manifest)
    frames = open_cache(clips, cfg.data.frames, cfg.data.frame_size, config.cache_dir(cfg, "data"))
    captions = [image_caption(c.captions[0]) for c in clips]
    embed_captions(cfg.text, sorted(set(captions)), config.cache_dir(cfg, "text"), progress=False)
    text = EmbeddingCache.load(config.cache_dir(cfg, "text"), encoder_key(cfg.text))
    tokens = {c: text.get_tokens(c)[0] for c in [*set(captions), ""]}  # l d, padded as fine-tuning pads them
    objective = build_objective(cfg.diffusion)
    net = unet2d(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, weight_decay=0)
    g = torch.Generator().manual_seed(seed)
    ok = [i for i in range(len(clips)) if i not in frames.bad]
    log, start = [], time.time()
    for step in range(steps):
        rows = torch.randint(len(ok), (batch,), generator=g).tolist()
        at = torch.randint(cfg.data.frames, (batch,), generator=g).tolist()
        x0 = torch.stack([to_model(np.ascontiguousarray(frames.get(ok[r])[t:t + 1]))[0] for r, t in zip(rows, at)])
        drop = torch.rand(batch, generator=g) < cfg.diffusion.cond_dropout
        context = torch.stack([tokens["" if d else captions[ok[r]]] for r, d in zip(rows, drop)])  # b l d
        t = objective.draw_times(g, batch, "cpu")
        noise = torch.randn(x0.shape, generator=g)
        out = net(objective.noisy(x0, noise, t), objective.model_time(t), encoder_hidden_states=context).sample
        loss = F.mse_loss(out, objective.target(x0, noise, t))
        for group in opt.param_groups:  # the last fifth falls linearly to a tenth, to end on a settled minimum
            group["lr"] = cfg.train.lr * min(1.0, 0.1 + 0.9 * (steps - step) / (0.2 * steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": round(loss.item(), 4), "s": round(time.time() - start, 1)})
            print(f"pretrain step {step:05d} | loss {loss.item():.4f}", flush=True)
    net.save_pretrained(folder / "unet")
    info = {"steps": steps, "batch": batch, "seed": seed, "seconds": round(time.time() - start, 1), "log": log}
    (folder / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def scratch_base(work: Path, seed: int) -> Path:
    """The same network with random weights, as a folder of the same layout (one per seed)."""
    folder = work / f"scratch-base-seed{seed}"
    if not (folder / "unet" / "config.json").is_file():
        unet2d(seed).save_pretrained(folder / "unet")
    return folder


def run(variant: str, seed: int, steps: int, eval_every: int, work: Path, extra=()) -> dict:
    base = scratch_base(work, seed) if variant == "scratch" else work / "image-base"
    overrides = [*COMMON, f"model.pretrained={base}", *VARIANTS[variant], *extra]
    r = sweep.train_and_judge(work / f"{variant}-seed{seed}", overrides, seed, steps, eval_every, variant)
    return {"recipe": variant, **r}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS)
    sweep.add_run_args(p, STEPS, EVAL_EVERY, "/tmp/t2v-pretrain-evidence")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true", help="print the tables from the results")
    p.add_argument("--results", type=Path, default=RESULTS, help=f"where the results go (default {RESULTS})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting of every fine-tune (not of the pretraining), after the experiment's own")
    args = p.parse_args(argv)
    work, results_dir = Path(args.work), args.results.resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.one:
        name, seed = args.one[0], int(args.one[1])
        results_dir.mkdir(parents=True, exist_ok=True)
        r = run(name, seed, args.steps, args.eval_every, work, args.set)
        (results_dir / f"{name}-seed{seed}.json").write_text(json.dumps(r, indent=1) + "\n")
        return 0
    if not args.table:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            p.error(f"unknown variant(s) {unknown}: expected some of {', '.join(VARIANTS)}")
        if not (work / "image-base" / "unet" / "config.json").is_file():
            info = pretrain(work / "image-base", args.pretrain_steps)
            results_dir.mkdir(parents=True, exist_ok=True)
            (results_dir / "image-base.json").write_text(json.dumps(info, indent=1) + "\n")
        seeds = [int(s) for s in args.seeds.split(",")]
        common = ["--steps", str(args.steps), "--eval-every", str(args.eval_every), "--work", args.work,
                  "--results", str(results_dir), *(a for kv in args.set for a in ("--set", kv))]
        sweep.spawn([(f"{v}-seed{s}", [sys.executable, "-m", "bench.pretrain_evidence", "--one", v, str(s), *common])
                     for s in seeds for v in args.variants.split(",")], args.jobs, args.threads, work)
    results = [json.loads(f.read_text()) for f in sorted(results_dir.glob("*-seed*.json"))]
    print(sweep.tables(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
