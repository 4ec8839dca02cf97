"""Section ``scale``: the costs of growing past one process's memory and one core, side by side in one run.

  1. one optimizer step with train.grad_accum=4 at batch 8 vs 4 plain steps at batch 2 (the same clips through
     the network: the ratio is accumulation's overhead, ~1x expected);
  2. peak memory of a training step with model.checkpointing on vs off (peak RSS of a fresh process on CPU, peak
     CUDA memory on a GPU), batch 4 at 8x64x64;
  3. clip-cache build clips/s with 1 vs 2 decoding processes, and a 3-shard build + merge vs one build
     (MSR-VTT-shaped clips, bench/data_load.py).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from bench.common import REPO, Row, SectionResult, alternate, fmt_s, log, median, per_round_ratios
from bench.data_load import msrvtt_like_dataset
from bench.harness import Inputs, TrainStep, build_ours, forward_ours
from t2v.data.cache import build_cache, build_shard, merge_shards
from t2v.data.manifest import read_manifest

PEAK_MEMORY = """
import json, resource, sys, torch  # run with cwd = the repository: `bench` imports from it
from bench.harness import Inputs, TrainStep, build_ours, forward_ours
size, frames, pixels, batch, ckpt = {size!r}, {frames}, {pixels}, {batch}, {ckpt}
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
model = build_ours(size, 512)
model.checkpointing = ckpt
inp = Inputs(batch=batch, frames=frames, size=pixels, text_dim=512)
step = TrainStep(model, forward_ours, inp.clip(device), inp.pooled(device), "bf16" if device.type == "cuda" else "fp32")
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for _ in range(2):
    step()
peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({{"peak_bytes": peak, "before_steps_bytes": before * 1024, "device": device.type}}))
"""


def peak_memory(size: str, frames: int, pixels: int, batch: int, ckpt: bool) -> dict:
    code = PEAK_MEMORY.format(size=size, frames=frames, pixels=pixels, batch=batch, ckpt=ckpt)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_scale(args) -> SectionResult:
    res = SectionResult("scale")
    quick = args.quick
    size, frames, pixels = ("tiny", 2, 16) if quick else (args.model_size, 8, 64)

    # 1. grad_accum=4 at batch 8 vs 4 plain steps at batch 2
    big, small = Inputs(8, frames, pixels, 512), Inputs(2, frames, pixels, 512)
    accum = TrainStep(build_ours(size, 512), forward_ours, big.clip("cpu"), big.pooled("cpu"), grad_accum=4)
    plain = TrainStep(build_ours(size, 512), forward_ours, small.clip("cpu"), small.pooled("cpu"))
    times = alternate({"accum": accum, "plain x4": lambda: [plain() for _ in range(4)]}, args.repeats, label="scale")
    ratio = median(per_round_ratios(times["accum"], times["plain x4"]))
    res.data["grad_accum"] = {"times": times, "ratio_accum_over_plain": ratio}
    res.rows.append(Row(f"grad_accum=4 step at batch 8 vs 4 plain steps at batch 2 ({size}, {frames}x{pixels}x{pixels})",
                        f"{ratio:.2f}x the time ({fmt_s(median(times['accum']))} vs {fmt_s(median(times['plain x4']))})",
                        "-", None, "accumulation's own overhead: the same clips go through the network either way"))
    accum = plain = None  # free both before the memory measurements

    # 2. activation checkpointing: peak memory in fresh processes
    mem = {ckpt: peak_memory(size, frames, pixels, 4, ckpt) for ckpt in (False, True)}
    off, on = mem[False]["peak_bytes"], mem[True]["peak_bytes"]
    what = "peak CUDA memory" if mem[False]["device"] == "cuda" else "peak RSS of the process"
    res.data["checkpointing"] = mem
    res.rows.append(Row(f"model.checkpointing=true vs off, {what} ({size}, batch 4, {frames}x{pixels}x{pixels})",
                        f"{on / 2**30:.2f} vs {off / 2**30:.2f} GiB ({1 - on / off:.0%} less)", "< off", on < off))

    # 3. cache builds: 1 vs 2 decoding processes, and 3 shards + merge vs one build
    workdir = Path(args.workdir)
    clips = read_manifest(msrvtt_like_dataset(workdir, 6 if quick else 24, seconds=2.0 if quick else 10.0))
    builds = workdir / "scale_caches"

    def build(workers):
        def run():
            shutil.rmtree(builds, ignore_errors=True)
            build_cache(clips, 8, 64, builds, progress=False, workers=workers)
        return run

    def sharded():
        shutil.rmtree(builds, ignore_errors=True)
        for i in range(3):
            build_shard(clips, 8, 64, builds, i, 3, progress=False)
        merge_shards(clips, 8, 64, builds, 3)

    times = alternate({"1 worker": build(1), "2 workers": build(2), "3 shards + merge": sharded}, args.repeats,
                      label="scale cache")
    n = len(clips)
    rates = {k: n / median(v) for k, v in times.items()}
    res.data["cache"] = {"times": times, "clips": n, "clips_per_s": rates}
    res.rows.append(Row(f"Clip-cache build, 2 decoding processes vs 1 ({n} MSR-VTT-shaped clips, 8x64x64)",
                        f"{median(per_round_ratios(times['1 worker'], times['2 workers'])):.2f}x "
                        f"({rates['2 workers']:.1f} vs {rates['1 worker']:.1f} clips/s)", "-", None,
                        "2 cores here; each worker process starts a fresh interpreter (spawn)"))
    res.rows.append(Row(f"Clip-cache build, 3 shards run one after another + merge vs one build ({n} clips)",
                        f"{median(per_round_ratios(times['3 shards + merge'], times['1 worker'])):.2f}x the time "
                        f"({fmt_s(median(times['3 shards + merge']))} vs {fmt_s(median(times['1 worker']))})", "-",
                        None, "the shard + merge overhead; on Slurm the shards run at once on as many nodes"))
    log(f"scale: accum {ratio:.2f}x, checkpointing {on / off:.2f}x memory")
    return res
