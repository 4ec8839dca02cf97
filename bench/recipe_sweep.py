"""The demo's recipe, chosen by evidence: `python bench/recipe_sweep.py [--recipes A,B] [--seeds 0,1,2] [--jobs 2]`.

Trains each of the four recipes (UNet or video transformer, DDPM with v-prediction or rectified flow) on the demo
data for several seeds, judges every few hundred steps' EMA weights on all 48 demo prompts (t2v/demo_eval.py:
colour, shape and motion accuracy per class, background) and reads the validation loss at fixed timesteps from
the run's metrics, each against training seconds. One seed cannot rank recipes: motion appears abruptly, and the
steps at which it does differ from seed to seed.

Each (recipe, seed) is its own process with OMP_NUM_THREADS=--threads, --jobs of them at a time, so every run
sees the same share of the machine and the seconds compare across recipes (they are not `make demo`'s seconds,
which uses both cores for one run). The seconds of an evaluation are its step times the run's median step time:
a minute of other work on the machine inflates a few step times, not the median. Results:
bench/results/recipes/<recipe>-seed<N>.json (a --tag variant: <recipe>+<tag>-seed<N>.json); `--table` prints the
tables of docs/recipe.md and draws docs/recipe_sweep.png from them.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench.demo_recipes import prepare, train_seconds  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "recipes"
PLOT = REPO / "docs" / "recipe_sweep.png"
# the targets for `make demo`: every colour, motion and shape class, and a black background
TARGET = {"color": 0.95, "motion": 0.95, "shape": 0.90, "background": 0.05}

# Each recipe spells out every setting it differs in, so that none depends on what configs/demo.yaml ships.
UNET = ["model.arch=unet", "model.size=small", "model.base_channels=16", "model.patch=1", "model.coords=true",
        "model.temporal_attention=true", "model.downsample_time=false"]
DIT = ["model.arch=dit", "model.hidden=64", "model.depth=4", "model.heads=4", "model.patch=2", "model.coords=false",
       "model.temporal_attention=false", "model.downsample_time=false"]
DDPM_V = ["diffusion.objective=ddpm", "diffusion.prediction=v", "diffusion.shift=8"]
FLOW = ["diffusion.objective=flow", "diffusion.prediction=eps", "diffusion.shift=8", "diffusion.logit_mean=0",
        "diffusion.logit_std=1"]
# the rate the four trained at and the guidance they were judged with (the demo has changed both since: docs/recipe.md)
SAMPLING = ["train.lr=2e-3", "train.guidance=5"]
RECIPES: dict[str, list[str]] = {
    "unet_ddpm": UNET + DDPM_V + SAMPLING,  # the demo's recipe before this comparison
    "unet_flow": UNET + FLOW + SAMPLING,
    "dit_ddpm": DIT + DDPM_V + SAMPLING,
    "dit_flow": DIT + FLOW + SAMPLING,
}
STEPS = 1500  # per run; the evaluations are at every EVAL_EVERY steps
EVAL_EVERY = 250


def run_one(name: str, seed: int, steps: int, eval_every: int, work: Path, extra: list[str], tag: str = "") -> dict:
    overrides = RECIPES[name] + extra
    r = train_and_judge(work / f"{label(name, tag)}-seed{seed}", overrides, seed, steps, eval_every, name)
    return {"recipe": label(name, tag), **r}


def train_and_judge(outdir: Path, overrides: list[str], seed: int, steps: int, eval_every: int, name: str) -> dict:
    """Train configs/demo.yaml with ``overrides`` for ``steps``, then judge every ``eval_every`` steps' checkpoint
    on all 48 demo prompts beside the validation loss at that step; returns the run's result."""
    from t2v import config
    from t2v.demo_eval import check
    from t2v.runlog import read_records
    from t2v.train import train

    cfg = config.load_config(REPO / "configs" / "demo.yaml", [
        *overrides, f"train.seed={seed}", f"train.steps={steps}", f"train.ckpt_every={eval_every}",
        f"train.keep_last={steps // eval_every + 1}", "train.sample_every=0", f"train.val_every={eval_every}",
        f"train.outdir={outdir}", "train.log_every=10", "train.tensorboard=false"], env={})
    prepare(cfg)
    if train(cfg) != 0:
        raise RuntimeError(f"{name} seed {seed}: training did not finish")
    seconds = train_seconds(outdir)
    val = {r["step"]: r["val_loss"] for r in read_records(outdir) if r.get("event") == "val"}
    evals = []
    for step in range(eval_every, steps + 1, eval_every):
        r = check(outdir / f"ckpt_{step:06d}.pt")
        evals.append({"step": step, "train_s": round(seconds[step], 1), "val_loss": val.get(step),
                      **{k: r[k] for k in ("color", "shape", "motion", "moving", "background")},
                      "per_shape": r["per_shape"], "per_color": r["per_color"], "per_motion": r["per_motion"]})
        print(f"  {name} seed {seed} step {step}: {json.dumps(evals[-1])}", flush=True)
    return {"seed": seed, "overrides": overrides, "steps": steps, "step_s": median_step_s(outdir),
            "threads": int(os.environ.get("OMP_NUM_THREADS", "0")), "date": time.strftime("%Y-%m-%d %H:%M"),
            "evals": evals}


def label(name: str, tag: str) -> str:
    """A variant's name: the recipe, then --tag (unet_flow+shift4), so it gets its own results and table rows."""
    return f"{name}+{tag}" if tag else name


def median_step_s(outdir: Path) -> float:
    from t2v.runlog import read_records

    return round(median([r["step_time"] for r in read_records(outdir) if "step_time" in r]), 4)


def seconds(r: dict, e: dict) -> float:
    """Training seconds at evaluation ``e`` of run ``r``: its step x the run's median step time."""
    return e["step"] * r["step_s"]


ALL = ("color", "motion", "shape", "background")
LAYOUT = ("color", "motion")  # what the caption says about where and when; shape is the slow part


def met(e: dict, kinds=ALL) -> bool:
    """Every class of each kind at its target: min over classes, not the mean (circles are the hard ones)."""
    return all(e["background"] <= TARGET[k] if k == "background" else min(e[f"per_{k}"].values()) >= TARGET[k]
               for k in kinds)


def reached(evals: list[dict], kinds=ALL) -> int | None:
    """The step of the first evaluation that meets the targets of ``kinds`` and after which none misses them (a
    lucky checkpoint between two misses does not count)."""
    for i, e in enumerate(evals):
        if all(met(later, kinds) for later in evals[i:]):
            return e["step"]
    return None


def spawn(jobs: list[tuple[str, list[str]]], n: int, threads: int, work: Path) -> None:
    """Run every (name, command) in its own process from the repository, n at a time, each logging to
    work/<name>.log."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    pending, running = list(jobs), []
    while pending or running:
        while pending and len(running) < n:
            name, cmd = pending.pop(0)
            log = open(Path(work) / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)))
            print(f"started {name}", flush=True)
        time.sleep(2)
        for item in [r for r in running if r[1].poll() is not None]:
            running.remove(item)
            print(f"finished {item[0]}: exit {item[1].returncode}", flush=True)


def tables(results: list[dict]) -> str:
    """Per recipe: seconds to every target per seed, and at the last evaluation each class's accuracy per seed."""
    from t2v.table import markdown_table

    by = {}
    for r in results:
        by.setdefault(r["recipe"], []).append(r)
    order = [n for n in RECIPES if n in by] + sorted(set(by) - set(RECIPES))
    def per_seed(runs, kinds) -> str:
        """Seconds to the targets of ``kinds``, per seed ("-": not within the run), and their median."""
        steps = [reached(r["evals"], kinds) for r in runs]
        times = [s * r["step_s"] if s else None for s, r in zip(steps, runs)]
        shown = " / ".join(f"{t:.0f}" if t is not None else "-" for t in times)
        return shown + (f" (median {median(times):.0f})" if all(t is not None for t in times) else "")

    rows = []
    for name in order:
        runs = sorted(by[name], key=lambda r: r["seed"])
        last = [r["evals"][-1] for r in runs]
        rows.append([name, f"{median([r['step_s'] for r in runs]):.3f}", len(runs), per_seed(runs, LAYOUT),
                     per_seed(runs, ALL), f"{median([min(e['per_shape'].values()) for e in last]):.0%}",
                     f"{median([e['shape'] for e in last]):.0%}", f"{median([e['val_loss'] for e in last]):.4f}"])
    first = markdown_table(["recipe", "s/step (1 thread)", "seeds", "s to colour + motion, per seed",
                            "s to every target, per seed", "worst shape at the end (median)",
                            "shape at the end (median)", "val loss at the end (median)"], rows)
    rows = []
    for name in order:
        for r in sorted(by[name], key=lambda r: r["seed"]):
            e = r["evals"][-1]
            rows.append([name, r["seed"], e["step"], f"{seconds(r, e):.0f}", f"{min(e['per_color'].values()):.0%}",
                         f"{min(e['per_motion'].values()):.0%}",
                         *[f"{e['per_shape'][s]:.0%}" for s in sorted(e["per_shape"])], f"{e['background']:.3f}",
                         f"{e['val_loss']:.4f}" if e["val_loss"] is not None else "-"])
    shapes = sorted(results[0]["evals"][-1]["per_shape"]) if results else []
    second = markdown_table(["recipe", "seed", "step", "train s", "worst colour", "worst motion",
                             *[f"{s}s" for s in shapes], "background", "val loss"], rows)
    return first + "\n\n" + second


def plot(results: list[dict], path: Path) -> None:
    """Worst-class accuracy (colour, motion, shape) and the validation loss against training seconds, one line per
    run, one colour per recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 5))
    colours = dict(zip(RECIPES, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    variants = sorted({r["recipe"] for r in results} - set(RECIPES))  # --tag runs: dashed, colours of their own
    others = [c for i, c in enumerate(plt.get_cmap("tab20").colors) if i // 2 not in (0, 1, 2, 3)]  # not the four's
    colours.update((v, others[i % len(others)]) for i, v in enumerate(variants))
    for r in sorted(results, key=lambda r: (r["recipe"], r["seed"])):
        x = [seconds(r, e) for e in r["evals"]]
        c, ls = colours.get(r["recipe"], "black"), "--" if r["recipe"] in variants else "-"
        label = r["recipe"] if r["seed"] == min(q["seed"] for q in results if q["recipe"] == r["recipe"]) else None
        for ax, key in zip(axes, ("color", "motion", "shape")):
            ax.plot(x, [min(e[f"per_{key}"].values()) for e in r["evals"]], color=c, ls=ls, alpha=0.8, label=label)
        axes[3].plot(x, [e["val_loss"] for e in r["evals"]], color=c, ls=ls, alpha=0.8, label=label)
    for ax, key in zip(axes, ("color", "motion", "shape")):
        ax.set_title(f"worst {'colour' if key == 'color' else key} class accuracy")
        ax.set_ylim(0, 1.02)
        ax.axhline(TARGET[key], color="k", lw=0.8, ls=":")
    axes[3].set_title("validation loss (each objective's own target)")
    axes[3].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training seconds (1 thread)")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=5, fontsize="small")
    fig.tight_layout(rect=(0, 0.16, 1, 1))  # the legend below the plots
    fig.savefig(path, dpi=80)


def add_run_args(p, steps: int, eval_every: int, work: str) -> None:
    """What every sweep of judged demo runs takes: its length, how often it is judged, how it shares the machine."""
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--eval-every", type=int, default=eval_every)
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    p.add_argument("--work", default=work)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipes", default=",".join(RECIPES))
    add_run_args(p, STEPS, EVAL_EVERY, "/tmp/t2v-recipe-sweep")
    p.add_argument("--extra", default="",
                   help="key=value,... added to every recipe (a list value may hold commas: k=[1,2])")
    p.add_argument("--tag", default="", help="name of the --extra variant: its results are RECIPE+TAG-seedN.json")
    p.add_argument("--one", nargs=2, metavar=("RECIPE", "SEED"), help=argparse.SUPPRESS)
    p.add_argument("--table", action="store_true", help="print the tables and draw the plot from the results")
    args = p.parse_args(argv)
    if args.extra and not args.tag:
        p.error("--extra needs --tag, so that a variant does not overwrite its recipe's results")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.one:
        name, seed = args.one[0], int(args.one[1])
        # a comma starts a new key=value only where one follows: model.channel_mults=[1,2,2] stays whole
        extra = [o for o in re.split(r",(?=[\w.]+=)", args.extra) if o]
        r = run_one(name, seed, args.steps, args.eval_every, Path(args.work), extra, args.tag)
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{label(name, args.tag)}-seed{seed}.json").write_text(json.dumps(r, indent=1) + "\n")
        return 0
    if not args.table:
        unknown = [n for n in args.recipes.split(",") if n not in RECIPES]
        if unknown:
            p.error(f"unknown recipe(s) {unknown}: expected some of {', '.join(RECIPES)}")
        seeds = [int(s) for s in args.seeds.split(",")]
        # seed-major: the first seed of every recipe finishes first, so a partial sweep still compares all four
        common = ["--steps", str(args.steps), "--eval-every", str(args.eval_every), "--work", args.work,
                  *(["--extra", args.extra] if args.extra else []), *(["--tag", args.tag] if args.tag else [])]
        spawn([(f"{label(n, args.tag)}-seed{s}", [sys.executable, "-m", "bench.recipe_sweep", "--one", n, str(s), *common])
               for s in seeds for n in args.recipes.split(",")], args.jobs, args.threads, Path(args.work))
    results = [json.loads(f.read_text()) for f in sorted(RESULTS.glob("*.json"))]
    print(tables(results))
    if results:
        plot(results, PLOT)
        print(f"plot: {PLOT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
