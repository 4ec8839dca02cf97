"""Section ``gpu``: clips/s, MFU and peak memory of ``base`` and ``large`` in bf16 with channels-last and
torch.compile, and the largest batch that fits (doubling search, catching OOM). Skipped without CUDA;
``--quick`` still exercises the pure parts on CPU (FLOP counting of a tiny model, MFU arithmetic, the search).

MFU = (forward + backward FLOPs of a step, counted by torch.utils.flop_counter.FlopCounterMode) / step time /
the card's dense bf16 peak. Elementwise work (norms, activations, the optimizer, EMA) is not counted.
"""
from __future__ import annotations

import gc
from typing import Callable

import torch

from bench.common import Row, SectionResult, alternate, fmt_rate, fmt_s, log, median
from bench.harness import Inputs, TrainStep, build_ours, count_train_flops, forward_ours

# Dense bf16 tensor-core peaks (TFLOP/s) from the vendor data sheets, without sparsity. First match wins.
PEAK_BF16_TFLOPS = [
    ("H200", 989.0), ("GH200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
    ("H800", 989.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("A10G", 70.0), ("A10", 125.0), ("A6000", 155.0), ("RTX 4090", 165.0), ("RTX 3090", 71.0),
    ("B200", 2250.0), ("MI300X", 1307.0), ("MI250X", 383.0),
]


def peak_tflops(name: str, override: float | None = None) -> float | None:
    if override:
        return float(override)
    for key, tf in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tf
    return None


def mfu(flops_per_step: float, step_s: float, peak_tf: float | None) -> float | None:
    if not peak_tf or step_s <= 0:
        return None
    return flops_per_step / step_s / (peak_tf * 1e12)


def is_oom(e: BaseException) -> bool:
    oom = getattr(torch.cuda, "OutOfMemoryError", ())
    return (oom and isinstance(e, oom)) or "out of memory" in str(e).lower()


def largest_batch(try_batch: Callable[[int], None], start: int = 1, cap: int = 4096) -> tuple[int, int | None]:
    """Doubling search: (largest batch that ran, first batch that ran out of memory or None if none did up to
    ``cap``). ``try_batch(b)`` runs one training step at batch b and raises on OOM."""
    ok, b = 0, start
    while b <= cap:
        try:
            try_batch(b)
        except Exception as e:  # noqa: BLE001 - only OOM is expected; anything else propagates
            if not is_oom(e):
                raise
            return ok, b
        ok = b
        b *= 2
    return ok, None


def _free_cuda():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def selftest() -> dict:
    """The pure parts, on CPU: FLOPs of a tiny model's step, MFU arithmetic, the doubling search."""
    inp = Inputs(batch=1, frames=2, size=16, text_dim=32)
    model = build_ours("tiny", inp.text_dim)
    flops = count_train_flops(model, forward_ours, inp.clip("cpu"), inp.pooled("cpu"))
    assert flops["forward"] > 0 and flops["backward"] >= flops["forward"], flops
    assert abs(mfu(1e12, 1.0, 1.0) - 1.0) < 1e-9 and mfu(1e12, 1.0, None) is None
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops("NVIDIA H100 PCIe") == 756.0
    limit = 40

    def fake(b):
        if b > limit:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert largest_batch(fake) == (32, 64), largest_batch(fake)
    return {"tiny_step_flops": flops, "search_check": "largest_batch(fake OOM above 40) == (32, 64)"}


def bench_gpu(args) -> SectionResult:
    res = SectionResult("gpu")
    if not torch.cuda.is_available():
        res.skipped = "no CUDA GPU here (torch.cuda.is_available() is False): GPU throughput, MFU and batch search skipped"
        if args.quick:
            res.data["selftest"] = selftest()
            res.skipped += "; --quick ran the CPU self-test of FLOP counting, MFU and the batch search"
        log(f"gpu: {res.skipped}")
        return res
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name, args.peak_tflops)
    sizes = ["tiny"] if args.quick else ["base", "large"]
    frames, size, text_dim = (4, 16, 64) if args.quick else (8, 64, 512)
    batches = [2] if args.quick else args.gpu_batches
    res.data["config"] = {"gpu": name, "peak_bf16_tflops": peak, "precision": "bf16", "channels_last": True,
                          "compile": not args.no_compile, "frames": frames, "size": size, "batches": batches}
    out = {}
    for s in sizes:
        entry = {}
        # FLOPs per clip, counted eagerly on the GPU at batch 2 (they scale linearly with the batch)
        inp = Inputs(batch=2, frames=frames, size=size, text_dim=text_dim)
        m = build_ours(s, text_dim).to(device).to(memory_format=torch.channels_last_3d)
        x = inp.clip(device).contiguous(memory_format=torch.channels_last_3d)
        flops = count_train_flops(m, forward_ours, x, inp.pooled(device), precision="bf16")
        entry["flops_per_clip"] = flops["per_clip"]
        del m, x
        _free_cuda()

        def try_batch(b, s=s):
            i = Inputs(batch=b, frames=frames, size=size, text_dim=text_dim)
            st = None
            try:
                st = TrainStep(build_ours(s, text_dim), forward_ours, i.clip(device), i.pooled(device), "bf16",
                               channels_last=True)
                st()
            finally:
                st = None
                _free_cuda()

        fit, oom_at = largest_batch(try_batch, cap=8 if args.quick else args.max_batch)
        entry["largest_batch_eager"] = fit
        entry["first_oom_batch"] = oom_at
        log(f"gpu: {s}: largest batch {fit} (eager bf16 channels-last), OOM at {oom_at}")
        for b in batches:
            if b > fit:  # does not fit (fit is the largest batch that ran, or the cap)
                continue
            i = Inputs(batch=b, frames=frames, size=size, text_dim=text_dim)
            torch.cuda.reset_peak_memory_stats()
            st = TrainStep(build_ours(s, text_dim), forward_ours, i.clip(device), i.pooled(device), "bf16",
                           channels_last=True, compile=not args.no_compile)
            for _ in range(3):  # compile + warmup
                st()
            times = alternate({f"{s}@{b}": lambda: [st() for _ in range(10)]}, args.repeats, warmup=0,
                              label="gpu")[f"{s}@{b}"]
            step_s = median(times) / 10
            entry[f"batch{b}"] = {"step_s": step_s, "clips_per_s": b / step_s,
                                  "mfu": mfu(flops["per_clip"] * b, step_s, peak),
                                  "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
                                  "raw_s_per_10_steps": times}
            del st
            _free_cuda()
        out[s] = entry
        for b in batches:
            e = entry.get(f"batch{b}")
            if e is None:
                continue
            m_ = f"{e['mfu']:.1%}" if e["mfu"] is not None else "n/a (unknown peak; --peak-tflops)"
            res.rows.append(Row(f"GPU {s} bf16 channels-last{'' if args.no_compile else ' compiled'}, batch {b} ({name})",
                                f"{fmt_rate(e['clips_per_s'])} clips/s, MFU {m_}, peak {e['peak_memory_gib']:.1f} GiB, "
                                f"{fmt_s(e['step_s'])}/step", "-", None))
        res.rows.append(Row(f"GPU {s}: largest batch that fits ({name})",
                            f"{fit}{'' if oom_at else '+ (cap reached)'}", "-", None,
                            "doubling search, one eager bf16 channels-last step per size"))
    res.data["results"] = out
    return res
