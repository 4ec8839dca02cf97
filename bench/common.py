"""Shared pieces of the benchmarks: side-by-side timing, machine description, the result record.

Every figure the benchmarks report is a RATIO of two things measured in the same process, in alternating
rounds (A B, then B A, ...), so that load from other work on a shared machine hits both sides alike; the
absolute numbers are printed too, but only the ratios are meant to be compared between machines.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Mapping

REPO = Path(__file__).resolve().parents[1]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs) -> float:
    xs = list(xs)
    return float(statistics.median(xs)) if xs else float("nan")


def alternate(contenders: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1,
              label: str = "") -> dict[str, list[float]]:
    """Run each contender once per round, ``warmup`` rounds discarded then ``repeats`` kept; the order is
    reversed every other round (ABBA). Returns the kept wall-clock seconds of each contender, in round order."""
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            t0 = time.perf_counter()
            contenders[name]()
            dt = time.perf_counter() - t0
            kept = r >= warmup
            if kept:
                times[name].append(dt)
            log(f"{label}{' ' if label else ''}round {r + 1}/{warmup + repeats}{'' if kept else ' (warmup)'}: "
                f"{name} {dt:.3f} s")
    return times


def per_round_ratios(slow: list[float], fast: list[float]) -> list[float]:
    """slow[i] / fast[i] for each round: how many times faster ``fast`` was in that round."""
    return [s / f for s, f in zip(slow, fast)]


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover - not on every platform
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = None
    try:  # the version only: importing it is bench/harness.py's business (it needs a torchvision stand-in)
        vdp_version = version("video-diffusion-pytorch")
    except PackageNotFoundError:
        vdp_version = None
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        affinity = None
    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count(),
               "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}",
               "cuda": torch.version.cuda}
    return {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": affinity,
        "cpu_model": cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers_version,
        "video_diffusion_pytorch": vdp_version,
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "load_average_start": load_average(),
    }


@dataclass
class Row:
    """One line of the final table."""

    name: str
    measured: str
    target: str
    passed: bool | None  # None: informational, no target
    detail: str = ""
    # "benchmark": the main table; "adopted": a change t2v has taken, measured before -> after (bench/previous.py
    # vs the shipped code); "candidate": a change t2v could still take, measured shipped vs the change
    group: str = "benchmark"
    skipped: bool = False  # not measured here (``measured`` says why), e.g. a peer library that is not installed

    @property
    def verdict(self) -> str:
        if self.skipped:
            return "skipped"
        return "info" if self.passed is None else ("PASS" if self.passed else "FAIL")

    @classmethod
    def from_json(cls, d: dict) -> "Row":
        """A row read back from a result JSON (older files say ``proposal: true`` for a candidate)."""
        verdict = d.get("verdict", "info")
        group = d.get("group") or ("candidate" if d.get("proposal") else "benchmark")
        return cls(d["name"], d["measured"], d["target"], None if verdict in ("info", "skipped") else verdict == "PASS",
                   d.get("detail", ""), group, skipped=verdict == "skipped")


@dataclass
class SectionResult:
    name: str
    rows: list[Row] = field(default_factory=list)
    data: dict = field(default_factory=dict)  # config, raw timings, ratios: goes to the JSON file
    skipped: str | None = None  # why the section did not run
    error: str | None = None  # traceback when it crashed
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"name": self.name, "skipped": self.skipped, "error": self.error, "seconds": round(self.seconds, 2),
                "rows": [{"name": r.name, "measured": r.measured, "target": r.target, "verdict": r.verdict,
                          "detail": r.detail, "group": r.group} for r in self.rows],
                **self.data}


def fmt_rate(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def fmt_s(x: float) -> str:
    if x != x:
        return "n/a"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.1f} µs"


class Threads:
    """Set torch's intra-op threads (and optionally the CPU affinity) for a block, then restore them."""

    def __init__(self, n: int, pin: bool = False):
        self.n, self.pin = n, pin

    def __enter__(self):
        import torch

        self.before = torch.get_num_threads()
        torch.set_num_threads(self.n)
        self.affinity = None
        if self.pin and hasattr(os, "sched_setaffinity"):
            self.affinity = os.sched_getaffinity(0)
            os.sched_setaffinity(0, sorted(self.affinity)[: self.n])
        return self

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.before)
        if self.affinity is not None:
            os.sched_setaffinity(0, self.affinity)
        return False
