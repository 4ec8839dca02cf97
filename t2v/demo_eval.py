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


def check(ckpt, steps: int | None = None, guidance: float | None = None, seed: int = 0, out: Path | None = None,
          samples: int = 1) -> dict:
    """Judge samples of every demo prompt from a checkpoint (file or run folder); write out/demo_check.json.

    ``samples`` > 1 draws every prompt that many times (sampling seeds seed, seed + 1, ...) and pools the verdicts:
    16 clips per shape resolve a class to a clip or two, and a model that draws 92% of its circles passes the 90%
    target with one seed about two times in three (docs/recipe.md, "Cheaper steps that cost circles")."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    path = resolve_checkpoint(ckpt)
    cfg, model, step, fps = load_ema_and_rate(path)
    prompts = [prompt_of(*p) for p in PROMPTS]
    text, tokens, token_mask = embed_prompts(cfg, prompts)
    steps = cfg.train.sample_steps if steps is None else steps
    guidance = cfg.train.guidance if guidance is None else guidance
    seeds = list(range(seed, seed + samples))
    start = time.time()
    videos = [generate(model, cfg, text, tokens=tokens, token_mask=token_mask, steps=steps, guidance=guidance,
                       seed=s, fps=fps) for s in seeds]  # one b t c h w batch of the 48 prompts per seed
    verdicts = [judge(to_uint8(v)) for batch in videos for v in batch]
    wanted = PROMPTS * samples  # the prompt of every verdict, seed after seed
    result = {"step": step, "ckpt": str(path), **score(verdicts, wanted), "ddim_steps": steps,
              "sampler": "Euler" if cfg.diffusion.objective == "flow" else "DDIM", "guidance": guidance,
              "seed": seed, "seeds": seeds, "sample_seconds": round(time.time() - start, 1),
              "per_color": _per(verdicts, wanted, "color", 0), "per_shape": _per(verdicts, wanted, "shape", 1),
              "per_motion": _per(verdicts, wanted, "motion", 2),
              "clips": [{"prompt": prompt_of(*p), "seed": seeds[i // len(PROMPTS)], **dataclasses.asdict(v)}
                        for i, (p, v) in enumerate(zip(wanted, verdicts))]}
    if out is not None:
        write_json(out / RESULT, result)
        rows = grid_rows()
        save_grid(videos[0][rows], out / "demo_check.png", [prompts[i] for i in rows])  # the first seed's
    return result


def grid_rows() -> list[int]:
    """12 of the 48 prompts in which every colour x shape pair appears once and every motion three times."""
    return [i * len(MOTIONS) + (i % len(MOTIONS) + i // len(MOTIONS)) % len(MOTIONS) for i in range(len(PROMPTS) // len(MOTIONS))]


def _per(verdicts, wanted, field: str, i: int) -> dict:
    """Accuracy of ``field`` per value the prompts ask for (e.g. per motion); wanted[k] is verdict k's prompt."""
    names = sorted({p[i] for p in wanted}, key=[p[i] for p in wanted].index)
    return {n: sum(getattr(v, field) == n for v, p in zip(verdicts, wanted) if p[i] == n) /
            sum(p[i] == n for p in wanted) for n in names}


def summary(r: dict) -> str:
    seeds = len(r.get("seeds", [r.get("seed")]))
    clips = f"{len(PROMPTS)} prompts" + (f" x {seeds} sampling seeds" if seeds > 1 else "")
    return (f"demo check at step {r['step']} ({clips}, {r.get('sampler', 'DDIM')} {r['ddim_steps']}, "
            f"guidance {r['guidance']:g}): "
            f"colour {r['color']:.0%} (chance 25%), shape {r['shape']:.0%} (chance 33%), motion {r['motion']:.0%} "
            f"(chance 25%), steady {r['steady']:.0%} (right and never jumping back), "
            f"moving {r['moving']:.0%} (any way), all three {r['all']:.0%}; "
            f"background brightness {r['background']:.3f} (black = 0)")
