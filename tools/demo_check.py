"""Does the demo model follow its captions? `python tools/demo_check.py RUN_DIR_OR_CKPT`.

Samples every colour x shape x motion prompt of the demo data from the EMA weights and counts how often the
sampled clip's dominant colour is the colour the caption names. Chance is 25%; the demo aims at >= 80%.
Writes RUN/eval/demo_colors.json and prints the accuracy per colour.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from t2v.data.demo import COLORS, MOTIONS, SHAPES, dominant_color  # noqa: E402
from t2v.sample import embed_prompts, generate, load_ema, resolve_checkpoint, save_grid, to_uint8  # noqa: E402


def color_accuracy(ckpt, steps: int = 25, guidance: float | None = None, seed: int = 0, out: Path | None = None):
    path = resolve_checkpoint(ckpt)
    cfg, model, step = load_ema(path)
    prompts = [f"a {c} {s} moving {m}" for c, s, m in itertools.product(COLORS, SHAPES, MOTIONS)]
    text, tokens, token_mask = embed_prompts(cfg, prompts)
    guidance = cfg.train.guidance if guidance is None else guidance
    videos = generate(model, cfg, text, tokens=tokens, token_mask=token_mask, steps=steps, guidance=guidance, seed=seed)
    wanted = [p.split()[1] for p in prompts]
    got = [dominant_color(to_uint8(v)) for v in videos]
    per_color = {c: sum(w == g == c for w, g in zip(wanted, got)) / wanted.count(c) for c in COLORS}
    result = {"step": step, "ckpt": str(path), "accuracy": sum(w == g for w, g in zip(wanted, got)) / len(prompts),
              "per_color": per_color, "num": len(prompts), "ddim_steps": steps, "guidance": guidance, "seed": seed,
              "confusions": [(p, g) for p, w, g in zip(prompts, wanted, got) if w != g]}
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "demo_colors.json").write_text(json.dumps(result, indent=1))
        save_grid(videos[:: len(SHAPES) * len(MOTIONS) // 2], out / "demo_colors.png",
                  prompts[:: len(SHAPES) * len(MOTIONS) // 2])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run = Path(args.run)
    out = (run if run.is_dir() else run.parent) / "eval"
    r = color_accuracy(run, args.steps, args.guidance, args.seed, out)
    print(f"demo colour check at step {r['step']}: {r['accuracy']:.0%} of {r['num']} prompts sampled in the "
          f"colour their caption names (chance 25%)")
    print("  " + "  ".join(f"{c} {a:.0%}" for c, a in r["per_color"].items()))
    print(f"  {out / 'demo_colors.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
