"""Where does the caption start to matter? `python tools/demo_probe.py RUN_DIR_OR_CKPT [--t 200,500,...]`.

Takes one real demo clip per colour x shape x motion, noises it to each timestep t with fixed noise, lets the
EMA model predict x0 in one step, with the caption and without it (the null caption), and judges the
predictions like samples (t2v.data.demo_judge). At low t the noisy input alone gives colour, shape and motion
away, so both columns are high; where the "without" column falls to chance and the "with" column does not,
the model draws that attribute from the caption. Sampling decides layout and motion at the high-noise end,
so a model whose "with" column falls at t >= 900 samples clips that ignore what the caption says about them.
Writes RUN/eval/demo_probe.json and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from t2v.data.demo_judge import judge, score
from t2v.data.manifest import read_manifest
from t2v.data.video import decode_uint8, to_model
from t2v.sample import embed_prompts, load_ema, resolve_checkpoint, to_uint8
from t2v.demo_eval import PROMPTS, prompt_of
from t2v.objective import build_objective

TIMESTEPS = (200, 500, 800, 900, 950, 990)


def demo_clips(cfg) -> tuple[torch.Tensor, list[tuple[str, str, str]]]:
    """One training clip per (colour, shape, motion), as the model sees them: n t c h w in [-1, 1]."""
    rows = {}
    for line in Path(cfg.data.manifest).read_text().splitlines():
        r = json.loads(line)
        rows.setdefault((r["color"], r["shape"], r["motion"]), r["id"])
    by_id = {c.id: c for c in read_manifest(cfg.data.manifest, cfg.data.video_root)}
    wanted = [p for p in PROMPTS if p in rows]
    videos = [to_model(decode_uint8(by_id[rows[p]].video, cfg.data.frames, cfg.data.frame_size)) for p in wanted]
    return torch.stack(videos), wanted


@torch.no_grad()
def probe(ckpt, timesteps=TIMESTEPS, seed: int = 0) -> dict:
    path = resolve_checkpoint(ckpt)
    cfg, model, step = load_ema(path)
    x0, wanted = demo_clips(cfg)
    text, tokens, mask = embed_prompts(cfg, [prompt_of(*w) for w in wanted])
    objective = build_objective(cfg.diffusion)
    g = torch.Generator().manual_seed(seed)
    rows = []
    for t_int in timesteps:
        noise = torch.randn(x0.shape, generator=g)  # n t c h w
        t = objective.fixed_times(t_int, x0.shape[0], "cpu")
        x_t = objective.noisy(x0, noise, t)
        row = {"t": t_int}
        for name, keep in (("with", True), ("without", False)):
            cond = torch.full((x0.shape[0],), keep, dtype=torch.bool)
            out = model(x_t, objective.model_time(t), text, tokens=tokens, token_mask=mask, cond_mask=cond)
            pred = objective.predict_x0(x_t, t, out, clip=True)
            s = score([judge(to_uint8(v)) for v in pred], wanted)
            row.update({f"{k}_{name}": s[k] for k in ("color", "shape", "motion")})
        rows.append(row)
    return {"step": step, "ckpt": str(path), "num": len(wanted), "rows": rows}


def table(r: dict) -> str:
    lines = [f"one-step x0 from noised demo clips, step {r['step']}, {r['num']} clips: accuracy with / without the caption",
             "     t | colour      | shape       | motion",
             "-------|-------------|-------------|------------"]
    for row in r["rows"]:
        cells = [f"{row[k + '_with']:4.0%} / {row[k + '_without']:4.0%}" for k in ("color", "shape", "motion")]
        lines.append(f"{row['t']:6d} | " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run", help="run folder or checkpoint")
    p.add_argument("--t", default=",".join(map(str, TIMESTEPS)), help="comma-separated timesteps")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    r = probe(args.run, tuple(int(x) for x in args.t.split(",")), args.seed)
    run = Path(args.run)
    out = (run if run.is_dir() else run.parent) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_probe.json").write_text(json.dumps(r, indent=1))
    print(table(r))
    print(f"  {out / 'demo_probe.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
