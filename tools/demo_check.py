"""Does the demo model do what its captions say? `python tools/demo_check.py RUN_DIR_OR_CKPT`.

Samples all 48 colour x shape x motion prompts of the demo from the EMA weights with the run's own sampler
settings (DDIM steps and guidance of the config) and judges every clip by its pixels (t2v.data.demo_judge):
colour (chance 25%), shape (chance 33%), motion direction (chance 25%) and how black the background is.
Writes RUN/eval/demo_check.json and a grid of a quarter of the prompts, prints the figures, and exits 1 when
a figure misses the targets given by --min-color/--min-shape/--min-motion/--max-background (0 = no check).
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2v.data.demo import COLORS, MOTIONS, SHAPES  # noqa: E402
from t2v.data.demo_judge import judge, score  # noqa: E402
from t2v.eval import write_json  # noqa: E402
from t2v.sample import embed_prompts, generate, load_ema_and_rate, resolve_checkpoint, save_grid, to_uint8  # noqa: E402

PROMPTS = [(c, s, m) for c, s, m in itertools.product(COLORS, SHAPES, MOTIONS)]
RESULT = "demo_check.json"


def prompt_of(color: str, shape: str, motion: str) -> str:
    return f"a {color} {shape} moving {motion}"  # the first caption form of every demo clip


def check(ckpt, steps: int | None = None, guidance: float | None = None, seed: int = 0, out: Path | None = None) -> dict:
    """Judge samples of every demo prompt from a checkpoint (file or run folder); write out/demo_check.json."""
    path = resolve_checkpoint(ckpt)
    cfg, model, step, fps = load_ema_and_rate(path)
    prompts = [prompt_of(*p) for p in PROMPTS]
    text, tokens, token_mask = embed_prompts(cfg, prompts)
    steps = cfg.train.sample_steps if steps is None else steps
    guidance = cfg.train.guidance if guidance is None else guidance
    start = time.time()
    videos = generate(model, cfg, text, tokens=tokens, token_mask=token_mask, steps=steps, guidance=guidance, seed=seed,
                      fps=fps)
    verdicts = [judge(to_uint8(v)) for v in videos]
    result = {"step": step, "ckpt": str(path), **score(verdicts, PROMPTS), "ddim_steps": steps, "guidance": guidance,
              "seed": seed, "sample_seconds": round(time.time() - start, 1),
              "per_color": _per(verdicts, "color", 0), "per_shape": _per(verdicts, "shape", 1),
              "per_motion": _per(verdicts, "motion", 2),
              "clips": [{"prompt": p, **dataclasses.asdict(v)} for p, v in zip(prompts, verdicts)]}
    if out is not None:
        write_json(out / RESULT, result)
        rows = grid_rows()
        save_grid(videos[rows], out / "demo_check.png", [prompts[i] for i in rows])
    return result


def grid_rows() -> list[int]:
    """12 of the 48 prompts in which every colour x shape pair appears once and every motion three times."""
    return [i * len(MOTIONS) + (i % len(MOTIONS) + i // len(MOTIONS)) % len(MOTIONS) for i in range(len(PROMPTS) // len(MOTIONS))]


def _per(verdicts, field: str, i: int) -> dict:
    """Accuracy of ``field`` per value the prompts ask for (e.g. per motion)."""
    names = sorted({p[i] for p in PROMPTS}, key=[p[i] for p in PROMPTS].index)
    return {n: sum(getattr(v, field) == n for v, p in zip(verdicts, PROMPTS) if p[i] == n) /
            sum(p[i] == n for p in PROMPTS) for n in names}


def summary(r: dict) -> str:
    return (f"demo check at step {r['step']} ({r['num']} prompts, DDIM {r['ddim_steps']}, guidance {r['guidance']:g}): "
            f"colour {r['color']:.0%} (chance 25%), shape {r['shape']:.0%} (chance 33%), motion {r['motion']:.0%} "
            f"(chance 25%), steady {r['steady']:.0%} (right and never jumping back), all three {r['all']:.0%}; background "
            f"brightness {r['background']:.3f} (black = 0)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the config's train.sample_steps)")
    p.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-color", type=float, default=0.0)
    p.add_argument("--min-shape", type=float, default=0.0)
    p.add_argument("--min-motion", type=float, default=0.0)
    p.add_argument("--max-background", type=float, default=1.0)
    args = p.parse_args(argv)
    run = Path(args.run)
    out = (run if run.is_dir() else run.parent) / "eval"
    r = check(run, args.steps, args.guidance, args.seed, out)
    print(summary(r))
    for field in ("color", "shape", "motion"):
        print(f"  {field:<6} " + "  ".join(f"{k} {a:.0%}" for k, a in r[f"per_{field}"].items()))
    print(f"  {out / RESULT}")
    missed = [f"{k} {r[k]:.0%} < {m:.0%}" for k, m in
              (("color", args.min_color), ("shape", args.min_shape), ("motion", args.min_motion)) if r[k] < m]
    if r["background"] > args.max_background:
        missed.append(f"background {r['background']:.3f} > {args.max_background:g}")
    if missed:
        print("demo check: below target: " + "; ".join(missed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
