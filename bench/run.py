"""t2v-slurm benchmarks: `python bench/run.py [--only train,data,text,preempt,gpu,exp,dit] [--quick] [--repeats N]
[--out bench/results]` (or `make bench ARGS="..."`).

Sections (all by default):
  train    training step (forward, backward, AdamW, EMA) of our `base` vs peers configured to within ±15 % of
           its parameters: diffusers' UNet3DConditionModel (vs ours, and vs ours with cross-attention on the
           same caption tokens) and video-diffusion-pytorch's Unet3D; 8x64x64 clips, batch 2; fp32 on CPU,
           bf16 on a GPU. A peer library that is not installed gets a row saying why
  data     DataLoader clips/s from the pre-decoded clip cache vs decord per sample, 1 core
  text     cached caption embeddings vs a CLIP-B/32-sized text encoder run every step
  preempt  checkpoint save time, process start to first step on resume, steps lost to SIGUSR1
  sharded  save and load of a sharded checkpoint folder (train.parallel=fsdp, DCP) vs one file, ~50 M parameters
  gpu      clips/s, MFU, peak memory, largest batch of base and large (bf16, channels-last, compile); CUDA only
  scale    grad_accum=4 vs 4 plain steps; peak memory with activation checkpointing; cache builds with 1 vs 2
           workers and 3 shards + merge
  latent   the same UNet's training step in the SD VAE's latent space vs pixel space at 256x256; latent-cache
           reads vs decode + VAE encode per sample; VAE encode clips/s
  dit      the video transformer (model.arch=dit): training step vs diffusers' LatteTransformer3DModel on latents
           with caption cross-attention, and vs our UNet in pixel space, both at params within ±15 %; clips/s and
           peak memory against frames x frame size for each architecture
  exp      speed changes to t2v.train, as variants of our own step: adopted fused AdamW (before -> after) and
           the demo's model in 2x2 patches (model.patch=2, at the demo's batch and clip size), candidate
           train.channels_last=true (shipped vs channels_last)

Changes that t2v has adopted are measured before -> after: the previous implementation (bench/previous.py)
against the shipped t2v code, in the same process. They and the remaining candidates get tables of their own.

Every figure is a ratio of two things timed side by side in this process (alternating rounds, median), so
that other work on a shared machine weighs on both sides. Results: a table on stdout,
`<out>/<name>-<timestamp>.json` (machine, config, raw timings, ratios) and `<out>/latest.md` (Markdown for the
docs/performance.md, "Latest figures"). With --only, latest.md still holds the full table: the sections not run are
carried over from the newest earlier full-size result JSON in <out> that has them, marked with the run they come
from (--no-carry: only this run's rows). `--quick` uses tiny sizes so the whole thing runs in seconds (tests/test_bench.py);
its numbers mean nothing and its targets are not judged. Exit status: 1 if a section crashed (or, with
--strict, if a target failed), else 0.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads: every model is built from a config

import torch  # noqa: E402

from bench.common import REPO, Row, SectionResult, load_average, log, machine_info  # noqa: E402
from t2v.table import markdown_table, text_table  # noqa: E402

# section -> "module:function", imported only when the section runs, so one broken section (a missing peer
# library, say) cannot stop the others
SECTION_FNS = {
    "train": "bench.train_bench:bench_train",
    "data": "bench.data_load:bench_data",
    "text": "bench.text_cache:bench_text",
    "preempt": "bench.preempt:bench_preempt",
    "gpu": "bench.gpu:bench_gpu",
    "latent": "bench.latent:bench_latent",
    "scale": "bench.scale:bench_scale",
    "exp": "bench.train_bench:bench_exp",
    "dit": "bench.dit_bench:bench_dit",
    "finetune": "bench.finetune:bench_finetune",
    "sharded": "bench.sharded:bench_sharded",
}
SECTIONS = tuple(SECTION_FNS)


def section_fn(name: str):
    module, _, fn = SECTION_FNS[name].partition(":")
    return getattr(importlib.import_module(module), fn)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run (default: all of {','.join(SECTIONS)})")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one round: a smoke test, not a measurement")
    p.add_argument("--repeats", type=int, default=None, help="measured rounds per comparison (default 3; 1 with --quick)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for the JSON and latest.md")
    p.add_argument("--name", default=None, help="result file name prefix (default: bench[-quick][-sections])")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's machine default, torch.get_num_threads(); "
                        "1 with --quick)")
    p.add_argument("--model-size", default="base", choices=["base", "large"],
                   help="our model for train/text/exp (base: the baseline's; large is matched to diffusers "
                        "(64,128,256,256), 38.7 M, and to video-diffusion-pytorch dim=120, 37.5 M)")
    p.add_argument("--gpu-batches", default="2,32", help="batch sizes timed in the gpu section")
    p.add_argument("--max-batch", type=int, default=4096,
                   help="gpu section: the largest batch the doubling search tries (caps its time)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU, if unknown")
    p.add_argument("--no-compile", action="store_true", help="gpu section: no torch.compile")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--no-carry", action="store_true",
                   help="latest.md: do not carry over the sections not run from earlier result JSONs in --out")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    bad = [s for s in only if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}: choose from {','.join(SECTIONS)}")
    args.only = only
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    args.gpu_batches = [int(b) for b in args.gpu_batches.split(",") if b.strip()]
    return args


GROUP_HEADS = {
    "benchmark": "Benchmark",
    "adopted": "Adopted change to t2v, measured before -> after",
    "candidate": "Candidate change to t2v (measured here, not adopted)",
}


def carried_mark(r: SectionResult) -> str:
    return f" [run {r.data['carried_from']}]" if r.data.get("carried_from") else ""


def table(results: list[SectionResult], markdown: bool, group: str = "benchmark") -> str:
    """One of the tables: the benchmarks, the adopted changes (before -> after) or the remaining candidates."""
    rows = [(GROUP_HEADS[group], "Measured", "Target", "Result")]
    for r in results:
        mark = carried_mark(r)
        if group == "benchmark" and r.error:
            rows.append((r.name + mark, "ERROR: " + r.error.strip().splitlines()[-1][:120], "-", "ERROR"))
        elif group == "benchmark" and r.skipped and not r.rows:
            rows.append((r.name + mark, "skipped: " + r.skipped, "-", "skipped"))
        for row in r.rows:
            if row.group == group:
                rows.append((row.name + mark, row.measured, row.target, row.verdict))
    if len(rows) == 1:
        return ""
    return markdown_table(rows[0], rows[1:]) if markdown else text_table(rows[0], rows[1:], rule=True)


def tables(results: list[SectionResult], markdown: bool) -> list[str]:
    return [t for t in (table(results, markdown, g) for g in GROUP_HEADS) if t]


def details(results: list[SectionResult]) -> list[str]:
    return [f"- {row.name}{carried_mark(r)}: {row.detail}" for r in results for row in r.rows if row.detail]


def carry_over(out: Path, missing: list[str]) -> tuple[list[SectionResult], dict[str, str]]:
    """The ``missing`` sections as the newest earlier full-size (not --quick) result JSON in ``out`` holding them
    (without error) recorded them; each marked with that run's timestamp. Returns them and {section: file}."""
    found: dict[str, SectionResult] = {}
    sources: dict[str, str] = {}
    records = []
    for path in out.glob("*.json"):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(rec, dict) and not rec.get("quick") and isinstance(rec.get("sections"), dict):
            records.append((str(rec.get("timestamp", "")), path, rec))
    for stamp, path, rec in sorted(records, key=lambda x: x[0], reverse=True):
        for name in missing:
            sec = rec["sections"].get(name)
            if name in found or not isinstance(sec, dict) or sec.get("error"):
                continue
            data = {k: v for k, v in sec.items() if k not in ("name", "skipped", "error", "seconds", "rows")}
            data["carried_from"] = stamp
            found[name] = SectionResult(name, rows=[Row.from_json(x) for x in sec.get("rows", [])], data=data,
                                        skipped=sec.get("skipped"), seconds=float(sec.get("seconds") or 0.0))
            sources[name] = path.name
    return [found[n] for n in missing if n in found], sources


def markdown(results, info, args, stamp, sources: dict[str, str] | None = None) -> str:
    gpu = info["gpu"]["name"] if info.get("gpu") else "no GPU"
    lines = [
        f"<!-- written by bench/run.py on {stamp}; docs/performance.md (Latest figures) carries it -->",
        f"Measured {time.strftime('%Y-%m-%d', time.localtime())} on {info['cpu_count']} CPU cores "
        f"({info['cpu_model']}), {gpu}; torch {info['torch']}, diffusers {info['diffusers'] or 'not installed'}, "
        f"video-diffusion-pytorch {info.get('video_diffusion_pytorch') or 'not installed'}, "
        f"{info['torch_threads']} torch threads{', --quick (tiny sizes: not a measurement)' if args.quick else ''}. "
        "Ratios come from alternating rounds in one process (median of "
        f"{args.repeats}); load average {info['load_average_start']} at the start, {info.get('load_average_end')} "
        "at the end.",
    ]
    if sources:
        by_file: dict[str, list[str]] = {}
        for name, f in sources.items():
            by_file.setdefault(f, []).append(name)
        lines.append("Sections " + "; ".join(f"{', '.join(names)} from {f}" for f, names in by_file.items())
                     + ": not re-run this time, carried over (rows marked [run <timestamp>]); they were measured "
                     "with the t2v code of that run.")
    lines.append("")
    for t in tables(results, markdown=True):
        lines += [t, ""]
    train = next((r for r in results if r.name == "train" and "config" in r.data), None)
    if train and "peer" in train.data["config"]:
        pc = train.data["config"]["peer"]
        xattn = train.data.get("params_all", {}).get("ours_xattn")  # absent in result files from before it
        lines.append(f"diffusers peer: `UNet3DConditionModel(block_out_channels={tuple(pc['block_out_channels'])}, "
                     f"layers_per_block={pc['layers_per_block']}, attention_head_dim={pc['attention_head_dim']}, "
                     f"norm_num_groups={pc['norm_num_groups']}, cross_attention_dim={pc['cross_attention_dim']}, "
                     f"in/out_channels=3)` with {train.data['params']['peer']:,} parameters vs our "
                     f"{train.data['params']['ours']:,}; it gets {pc['text']}, ours the pooled caption"
                     + (f"; ours with cross-attention ({xattn:,} parameters) gets the same tokens and the pooled "
                        "caption." if xattn else "."))
        lines.append("")
    if train and "vdp" in train.data["config"]:
        vc, vp = train.data["config"]["vdp"], train.data["comparisons"]["vdp"]["params"]
        args_s = ", ".join(f"{k}={tuple(v) if isinstance(v, list) else v}" for k, v in vc.items()
                           if k not in ("class", "text", "torchvision"))
        lines.append(f"video-diffusion-pytorch peer: `Unet3D({args_s})` with {vp['peer']:,} parameters vs our "
                     f"{vp['ours']:,}; it gets {vc['text']}, the same pooled caption as ours ({vc['torchvision']}).")
        lines.append("")
    lines += details(results)
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is None and args.quick:
        # tiny ops on a shared machine: a second thread mostly waits at each op's barrier for a busy core
        args.threads = 1
    # torch's machine default unless --threads; t2v.train subprocesses (preempt) get the same via OMP_NUM_THREADS
    torch.set_num_threads(args.threads or torch.get_num_threads())
    args.threads = torch.get_num_threads()
    info = machine_info()
    log(f"{info['cpu_count']} CPUs, torch {info['torch']} ({info['torch_threads']} threads), diffusers "
        f"{info['diffusers']}, GPU {info['gpu']['name'] if info['gpu'] else 'none'}; sections {','.join(args.only)}"
        f"{' (quick)' if args.quick else ''}, {args.repeats} measured rounds")
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="t2v-bench-")
        args.workdir = tmp.name
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    results: list[SectionResult] = []
    t_all = time.perf_counter()
    try:
        for name in args.only:
            log(f"--- {name}")
            t0 = time.perf_counter()
            try:
                res = section_fn(name)(args)
            except Exception:  # keep going: one broken section must not hide the others' numbers
                res = SectionResult(name, error=traceback.format_exc())
                log(f"{name} FAILED:\n{res.error}")
            res.seconds = time.perf_counter() - t0
            results.append(res)
    finally:
        if tmp is not None:
            tmp.cleanup()
    info["load_average_end"] = load_average()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = args.name or "bench" + ("-quick" if args.quick else "") + \
        ("" if list(args.only) == list(SECTIONS) else "-" + "-".join(args.only))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "name": name, "timestamp": stamp, "argv": sys.argv[1:] if argv is None else list(argv),
        "quick": args.quick, "repeats": args.repeats, "machine": info, "seconds": round(time.perf_counter() - t_all, 1),
        "sections": {r.name: r.to_json() for r in results},
    }
    # latest.md holds the full table: sections not run now come from the newest earlier full-size JSON
    shown, sources = results, {}
    missing = [s for s in SECTIONS if s not in args.only]
    if missing and not args.quick and not args.no_carry:
        carried, sources = carry_over(out, missing)
        by_name = {r.name: r for r in [*results, *carried]}
        shown = [by_name[s] for s in SECTIONS if s in by_name]
        if sources:
            record["carried_over_in_latest_md"] = sources
            log(f"latest.md: {', '.join(sources)} carried over from {', '.join(sorted(set(sources.values())))}")
    json_path = out / f"{name}-{stamp}.json"
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    (out / "latest.md").write_text(markdown(shown, info, args, stamp, sources))
    print()
    for t in tables(shown, markdown=False):
        print(t)
        print()
    for line in details(shown):
        print(line)
    print(f"\nresults: {json_path} and {out / 'latest.md'} ({record['seconds']:.0f} s)")
    crashed = [r.name for r in results if r.error]
    failed = [row.name for r in results for row in r.rows if row.passed is False]
    if crashed:
        print(f"crashed: {', '.join(crashed)}", file=sys.stderr)
        return 1
    if failed and args.strict:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
