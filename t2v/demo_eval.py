"""Judging a checkpoint on the demo: sample all 48 colour x shape x motion prompts from its EMA weights with the
run's own sampler settings (the objective's sampler, steps and guidance of its config) and judge every clip by its pixels
(t2v.data.demo_judge). `tools/demo_check.py` is the command; bench/demo_recipes.py and the tests call `check`.
"""
from __future__ import annotations

import dataclasses
import itertools
import time
from pathlib import Path

from t2v.data.demo import COLORS, MOTIONS, SHAPES
from t2v.data.demo_judge import judge, score
from t2v.eval import write_json
from t2v.sample import embed_prompts, generate, load_ema_and_rate, resolve_checkpoint, save_grid, to_uint8

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
    result = {"step": step, "ckpt": str(path), **score(verdicts, PROMPTS), "ddim_steps": steps,
              "sampler": "Euler" if cfg.diffusion.objective == "flow" else "DDIM", "guidance": guidance,
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
    return (f"demo check at step {r['step']} ({r['num']} prompts, {r.get('sampler', 'DDIM')} {r['ddim_steps']}, guidance {r['guidance']:g}): "
            f"colour {r['color']:.0%} (chance 25%), shape {r['shape']:.0%} (chance 33%), motion {r['motion']:.0%} "
            f"(chance 25%), steady {r['steady']:.0%} (right and never jumping back), all three {r['all']:.0%}; background "
            f"brightness {r['background']:.3f} (black = 0)")
