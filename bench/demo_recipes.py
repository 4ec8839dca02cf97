"""Demo recipes, judged: `python bench/demo_recipes.py RECIPE [RECIPE ...] [--steps N] [--eval-every K]`.

Each recipe is configs/demo.yaml plus key=value overrides. It trains on the demo data (demo/data, made if
absent), then samples all 48 prompts from the EMA weights of every K-th checkpoint with the recipe's own
sampler settings and judges colour, shape, motion and background (t2v/demo_eval.py). The figure that
matters is training seconds until motion >= 90% with colour >= 95% and shape >= 75% (time-to-target), so
recipes compete on learning per CPU-second, not on FLOP/s. Results go to
bench/results/demo_recipes/<recipe>.json; `--table` prints the Markdown table of every result there
(the ablation table of docs/performance.md).

Every recipe here runs one after the other in one process on the same machine; compare their rows within
one table (machines differ up to 2x; the table names the machine's large-matmul GFLOP/s).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "demo_recipes"
TARGET = {"color": 0.95, "shape": 0.75, "motion": 0.90}

# name -> overrides on top of configs/demo.yaml (the shipped recipe). The one-change rows were measured before
# temporal attention joined the recipe (it was itself one of them and won), so they carry
# model.temporal_attention=false: each row's difference from "no_temporal_attention" is that one change.
# The ablations below were measured from the DDPM demo (v-prediction) that configs/demo.yaml shipped before rectified
# flow won bench/recipe_sweep.py's comparison; DDPM_V keeps each row meaning what it measured.
# configs/demo.yaml's model before it took 2x2 patches and halved frames (docs/recipe.md, "Patches"), and its rate
# then
UNPATCHED_MODEL = ["model.size=small", "model.base_channels=16", "model.patch=1", "model.downsample_time=false"]
DDPM_DEMO = UNPATCHED_MODEL + ["train.lr=2e-3"]
DDPM_V = DDPM_DEMO + ["diffusion.objective=ddpm", "diffusion.prediction=v", "train.guidance=5"]
BEFORE_ATTENTION = DDPM_V + ["model.temporal_attention=false"]
RECIPES: dict[str, list[str]] = {
    "demo": [],
    "ddpm_demo": DDPM_V,  # the demo as it was before the flow recipe ("demo" in the results of that time)
    # the demo before issue 11
    "old_demo": DDPM_DEMO + ["model.base_channels=0", "model.coords=false", "model.temporal_attention=false",
                             "diffusion.objective=ddpm", "diffusion.prediction=eps", "diffusion.shift=1"],
    "no_temporal_attention": BEFORE_ATTENTION,
    **{name: BEFORE_ATTENTION + change for name, change in {
        "no_coords": ["model.coords=false"],
        "eps": ["diffusion.prediction=eps"],
        "shift1": ["diffusion.shift=1"],
        "shift16": ["diffusion.shift=16"],
        "snr_gamma5": ["diffusion.snr_gamma=5"],
        "cross_attention": ["model.cross_attention=true", "text.tokens=true"],
        "frame_cond": ["model.frame_cond=true"],
        "width32": ["model.base_channels=32"],
        "lr1e-3": ["train.lr=1e-3"],
        "lr4e-3": ["train.lr=4e-3"],
        "batch32": ["train.batch_size=32"],
        "ema0.999": ["train.ema_decay=0.999"],
        "size24": ["data.size=24"],
    }.items()},
}


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def prepare(cfg) -> None:
    """The demo data, its clip cache and caption embeddings (what `make demo` does before training)."""
    from t2v import config
    from t2v.data.cache import build_cache, open_cache
    from t2v.data.demo import make_demo
    from t2v.data.manifest import read_manifest
    from t2v.text import EmbeddingCache, embed_captions, encoder_key
    from t2v.demo_eval import PROMPTS, prompt_of

    make_demo(Path(cfg.data.manifest).parent)
    clips = read_manifest(cfg.data.manifest)
    if open_cache(clips, cfg.data.frames, cfg.data.frame_size, config.cache_dir(cfg, "data")) is None:
        build_cache(clips, cfg.data.frames, cfg.data.frame_size, config.cache_dir(cfg, "data"), progress=False)
    captions = sorted({"", *(c for clip in clips for c in clip.captions)} | {prompt_of(*p) for p in PROMPTS}
                      | set(cfg.train.sample_prompts))
    cache = EmbeddingCache.load(config.cache_dir(cfg, "text"), encoder_key(cfg.text))
    if cache.missing(captions) or (cfg.text.tokens and not cache.has_tokens):
        embed_captions(cfg.text, captions, config.cache_dir(cfg, "text"), progress=False)


def train_seconds(outdir: Path) -> dict[int, float]:
    """Cumulative seconds of training steps (previews and checkpoint writes excluded) at each logged step."""
    from t2v.runlog import read_records

    # an uninterrupted run: one record per logged step, each with the mean step time since the one before
    records = [r for r in read_records(outdir) if "event" not in r and "step_time" in r]
    out, total, last = {}, 0.0, 0
    for r in records:
        total += r["step_time"] * (r["step"] - last)
        out[int(r["step"])], last = total, r["step"]
    return out


def run_recipe(name: str, overrides: list[str], steps: int, eval_every: int, work: Path) -> dict:
    from t2v import config
    from t2v.train import train

    outdir = work / name
    shutil.rmtree(outdir, ignore_errors=True)
    cfg = config.load_config(REPO / "configs" / "demo.yaml", [
        *overrides, f"train.steps={steps}", f"train.ckpt_every={eval_every}", f"train.keep_last={steps // eval_every + 1}",
        "train.sample_every=0", "train.val_every=0", f"train.outdir={outdir}", "train.log_every=10"], env={})
    prepare(cfg)
    start = time.time()
    if train(cfg) != 0:
        raise RuntimeError(f"{name}: training did not finish")
    wall = time.time() - start
    seconds = train_seconds(outdir)
    evals = []
    for step in range(eval_every, steps + 1, eval_every):
        evals.append({"step": step, "train_s": round(seconds.get(step, float("nan")), 1), **judged(name, step, work)})
        print(f"  {name} step {step}: {evals[-1]}", flush=True)
    return with_target({"recipe": name, "overrides": overrides, "steps": steps, "train_wall_s": round(wall, 1),
                        "step_s": round(seconds[steps] / steps, 3), "evals": evals})


def judged(name: str, step: int, work: Path) -> dict:
    from t2v.demo_eval import check

    r = check(work / name / f"ckpt_{step:06d}.pt")
    return {k: r[k] for k in ("color", "shape", "motion", "all", "background")}


def with_target(result: dict) -> dict:
    hit = next((e for e in result["evals"] if all(e[k] >= v for k, v in TARGET.items())), None)
    motion = next((e for e in result["evals"] if e["motion"] >= TARGET["motion"]), None)
    result.update(time_to_target_s=hit["train_s"] if hit else None, steps_to_target=hit["step"] if hit else None,
                  time_to_motion_s=motion["train_s"] if motion else None, steps_to_motion=motion["step"] if motion else None)
    return result


def rejudge(path: Path, work: Path) -> dict:
    """Judge a result's checkpoints again (after a change to the judge), from the run kept in ``work``."""
    r = json.loads(path.read_text())
    for e in r["evals"]:
        e.update(judged(r["recipe"], e["step"], work))
        print(f"  {r['recipe']} step {e['step']}: {e}", flush=True)
    return with_target(r)


def shipped_steps() -> int:
    import yaml

    return int(yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["train"]["steps"])


def table(results: list[dict]) -> str:
    from t2v.table import markdown_table

    header = ["recipe", "overrides on configs/demo.yaml", "s/step", "step", "train s", "colour", "shape", "motion",
              "background", "to motion >= 90%", "to all targets"]
    rows = []
    for r in results:
        best = max(r["evals"], key=lambda e: (e["motion"] + e["shape"] + e["color"], e["step"]))
        last = r["evals"][-1]
        def reached(key):
            s = r.get(f"time_to_{key}_s")
            return f"{s / 60:.1f} min (step {r[f'steps_to_{key}']})" if s else f"not in {r['steps']} steps"

        shown = [e for e in r["evals"] if e is best or e is last
                 or (r["recipe"] == "demo" and e["step"] == shipped_steps())]  # and the step `make demo` stops at
        for e in shown:
            rows.append([r["recipe"], " ".join(r["overrides"]) or "(none)", f"{r['step_s']:.2f}", e["step"],
                         f"{e['train_s']:.0f}", f"{e['color']:.0%}", f"{e['shape']:.0%}", f"{e['motion']:.0%}",
                         f"{e['background']:.3f}", reached("motion"), reached("target")])
    return markdown_table(header, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("recipes", nargs="*", help=f"names in RECIPES ({', '.join(RECIPES)}) or NAME:key=value,key=value")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--work", default="/tmp/t2v-demo-recipes")
    p.add_argument("--table", action="store_true", help="print the table of every result in bench/results/demo_recipes")
    p.add_argument("--rejudge", action="store_true", help="judge the named recipes' kept checkpoints (in --work) again")
    args = p.parse_args(argv)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for spec in args.recipes if args.rejudge else ():
        path = RESULTS / f"{spec}.json"
        path.write_text(json.dumps(rejudge(path, Path(args.work)), indent=1) + "\n")
    for spec in () if args.rejudge else args.recipes:
        name, _, extra = spec.partition(":")
        overrides = RECIPES.get(name, []) + [o for o in extra.split(",") if o]
        if name not in RECIPES and not extra:
            p.error(f"unknown recipe {name!r}: expected one of {sorted(RECIPES)} or NAME:key=value,...")
        r = run_recipe(name, overrides, args.steps, args.eval_every, Path(args.work))
        r["machine_gflops"] = round(matmul_gflops(), 1)
        r["date"] = time.strftime("%Y-%m-%d %H:%M")
        (RESULTS / f"{name}.json").write_text(json.dumps(r, indent=1) + "\n")
        print(table([r]), flush=True)
    if args.table:
        order = list(RECIPES)  # the shipped recipe first, then what it was compared with
        results = sorted((json.loads(f.read_text()) for f in RESULTS.glob("*.json")),
                         key=lambda r: (order.index(r["recipe"]) if r["recipe"] in order else len(order), r["recipe"]))
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
