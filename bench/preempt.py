"""Section ``preempt``: what a preemption costs.

1. Save: ``t2v.train.save`` (the function the loop calls) writing the full state of ``base``: model, EMA,
   AdamW moments, RNG, config; atomic temp file + fsync + rename. Timed in this process.
2. Resume: ``python -m t2v.train`` started as a subprocess on a run folder holding that checkpoint (demo data,
   model.size=base, data.size=64, data.frames=8, log_every=1); measured from Popen to its first ``step`` line,
   minus that step's own time (``step_time`` from metrics.jsonl, which t2v.train writes with the line).
3. Steps lost: SIGUSR1 to the same process in the middle of a later step; it must save and exit with
   REQUEUE_EXIT. The step that was running when the signal was sent is found from metrics.jsonl's wall-clock
   timestamps (1 + the last step logged before the signal); lost = running step - checkpoint step (>= 0).
Also measured: the adopted numpy finiteness check in ``t2v.checkpoint.verify_state`` (run by every load), before ->
after: the previous version (bench/previous.py, one torch.isfinite per tensor) vs the shipped one, on the same
loaded checkpoint and end to end (process start to 'resumed from').
"""
from __future__ import annotations

import copy
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from bench.common import REPO, Row, SectionResult, alternate, fmt_s, log, median, per_round_ratios
from bench.data_load import demo_dataset, prepare
from bench.previous import verify_state_previous
from t2v import checkpoint as ckpt
from t2v import config
from t2v.models import build_model
from t2v.runlog import RunLog
from t2v.checkpointer import Checkpointer
from t2v.train import REQUEUE_EXIT

TARGET_LOST = 1
TARGET_RESUME_S = 15.0
STEP_LINE = re.compile(r"^step (\d+) \|")


def run_overrides(manifest: Path, cache_dir: Path, outdir: Path, quick: bool, steps: int) -> list[str]:
    model = ["model.size=tiny", "data.size=16", "data.frames=4", "text.dim=64"] if quick else \
            ["model.size=base", "data.size=64", "data.frames=8", "text.dim=512"]
    return [f"data.manifest={manifest}", f"data.cache_dir={cache_dir}", f"text.cache_dir={cache_dir}",
            "text.encoder=hash", *model, "data.num_workers=0", "train.batch_size=2", "train.device=cpu",
            f"train.outdir={outdir}", f"train.steps={steps}", "train.log_every=1", "train.ckpt_every=1000000",
            "train.sample_every=1000000", "train.keep_last=2"]


def clean_env(threads: int) -> dict:
    """The subprocess must see only our overrides: no CONFIG file, no baseline variables, no torchrun/Slurm
    ranks (which would make it wait for other ranks); and the benchmark's torch thread count."""
    drop = {"CONFIG", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", *config.ENV_VARS}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def save_state(cfg: config.Config, outdir: Path, step: int, model, ema, opt, scaler) -> float:
    t0 = time.perf_counter()
    checkpointer = Checkpointer(outdir, cfg, RunLog(outdir, enabled=False))
    checkpointer.attach(model, ema, opt, scaler, cfg.train.batch_size)
    checkpointer.save(step, 0.5)
    return time.perf_counter() - t0


def training_state(cfg: config.Config):
    """Model, EMA and an AdamW with its moments filled (one step), as they are mid-training."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, ema, opt, torch.amp.GradScaler("cpu", enabled=False)


def metrics_since(outdir: Path, since: float) -> list[dict]:
    out = []
    path = outdir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if "loss" in rec and rec.get("time", 0) >= since:
                out.append(rec)
    return out


def resume_and_signal(overrides: list[str], outdir: Path, start_step: int, timeout: float, threads: int) -> dict:
    """One `python -m t2v.train` resume: time to its first step line, then SIGUSR1 mid-step."""
    wall0 = time.time()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "t2v.train", *overrides], cwd=REPO, env=clean_env(threads),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue = queue.Queue()
    transcript: list[str] = []

    def reader():
        for line in proc.stdout:
            lines.put((time.perf_counter(), line.rstrip("\n")))
        lines.put((time.perf_counter(), None))

    threading.Thread(target=reader, daemon=True).start()

    def next_line(deadline):
        try:
            return lines.get(timeout=max(0.0, deadline - time.perf_counter()))
        except queue.Empty:
            return None, None

    deadline = t0 + timeout
    t_first = t_resumed = None
    first_step = None
    try:
        while t_first is None:
            t, line = next_line(deadline)
            if line is None:
                raise RuntimeError(f"t2v.train ended or timed out before its first step:\n" + "\n".join(transcript[-20:]))
            transcript.append(line)
            if line.startswith("resumed from"):
                t_resumed = t
            m = STEP_LINE.match(line)
            if m:
                t_first, first_step = t, int(m.group(1))
        # signal half-way through the next step (estimated from the first one)
        first_recs = metrics_since(outdir, wall0)
        est = first_recs[0]["step_time"] if first_recs else (t_first - (t_resumed or t0))
        time.sleep(0.5 * est)
        t_signal_wall = time.time()
        t_signal = time.perf_counter()
        proc.send_signal(signal.SIGUSR1)
        while True:
            t, line = next_line(deadline)
            if line is None:
                break
            transcript.append(line)
        rc = proc.wait(timeout=max(1.0, deadline - time.perf_counter()))
        t_exit = time.perf_counter()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    recs = metrics_since(outdir, wall0)
    if not recs:
        raise RuntimeError("no step records in metrics.jsonl:\n" + "\n".join(transcript[-20:]))
    before = [r["step"] for r in recs if r["time"] <= t_signal_wall]
    running = (max(before) if before else start_step) + 1  # 1-based count of the step running at the signal
    saved_step = ckpt.list_checkpoints(outdir)[-1][0]
    first_step_time = float(recs[0]["step_time"])
    to_first = t_first - t0
    return {"rc": rc, "expected_rc": REQUEUE_EXIT, "start_step": start_step, "first_step_logged": first_step,
            "popen_to_first_step_s": to_first, "first_step_s": first_step_time,
            "resume_overhead_s": to_first - first_step_time,
            "popen_to_resumed_line_s": (t_resumed - t0) if t_resumed else None,
            "running_step_at_signal": running, "checkpoint_step": saved_step,
            "steps_lost": max(0, running - saved_step), "extra_steps_after_signal": max(0, saved_step - running),
            "signal_to_exit_s": t_exit - t_signal, "transcript_tail": transcript[-6:]}


def verify_experiment(path: Path, repeats: int) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    # both must accept this state and reject a corrupted copy with the same message
    verify_state_previous(state, path)
    ckpt.verify_state(state, path)
    bad = dict(state, model=dict(state["model"]))
    k = next(k for k, v in bad["model"].items() if v.is_floating_point())
    bad["model"][k] = bad["model"][k].clone().fill_(float("nan"))
    msgs = []
    for fn in (verify_state_previous, ckpt.verify_state):
        try:
            fn(bad, path)
            msgs.append(None)
        except ckpt.CheckpointError as e:
            msgs.append(str(e))
    assert msgs[0] is not None and msgs[0] == msgs[1], msgs
    times = alternate({"before": lambda: [verify_state_previous(state, path) for _ in range(3)],
                       "after": lambda: [ckpt.verify_state(state, path) for _ in range(3)]},
                      repeats, warmup=1, label="preempt verify_state x3")
    times = {n: [t / 3 for t in v] for n, v in times.items()}
    return {"seconds": times, "speedup": median(times["before"]) / median(times["after"]),
            "per_round": per_round_ratios(times["before"], times["after"]), "same_error_message": True}


# t2v.train's own main(), as shipped ('after') or with the previous verify_state patched in ('before'); both
# variants import bench.previous so that they pay the same start-up.
_LAUNCH = (
    "import runpy, sys\n"
    "import t2v.checkpoint as c, bench.previous as p\n"
    "if sys.argv[1] == 'before': c.verify_state = p.verify_state_previous\n"
    "sys.argv = ['t2v.train'] + sys.argv[2:]\n"
    "runpy.run_module('t2v.train', run_name='__main__', alter_sys=True)\n"
)


def time_to_resumed_line(overrides: list[str], variant: str, threads: int, timeout: float) -> float:
    """Popen of t2v.train (as shipped, or with the previous verify_state) to its 'resumed from' line, which it
    prints once the checkpoint is loaded and verified and model, EMA and optimizer hold it; then killed."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", _LAUNCH, variant, *overrides], cwd=REPO, env=clean_env(threads),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    tail: list[str] = []
    try:
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        for line in proc.stdout:
            tail.append(line.rstrip("\n"))
            if line.startswith("resumed from"):
                return time.perf_counter() - t0
        raise RuntimeError(f"t2v.train ({variant}) never printed 'resumed from':\n" + "\n".join(tail[-20:]))
    finally:
        timer.cancel()
        proc.kill()
        proc.wait()


def bench_preempt(args) -> SectionResult:
    res = SectionResult("preempt")
    workdir = Path(args.workdir)
    n_train = 8 if args.quick else 48
    manifest = demo_dataset(workdir, n_train)
    cache_dir = workdir / f"preempt_cache{n_train}"
    start = 10
    runs = 1 if args.quick else max(2, args.repeats)
    steps = start + 100000
    outdir = workdir / "preempt_run"
    overrides = run_overrides(manifest, cache_dir, outdir, args.quick, steps)
    cfg = config.load_config(None, overrides, env={})
    prepare(manifest, cfg.data.frames, cfg.data.size, cfg.text.dim, cache_dir)

    # 1. save time (the same state each time; the last one is where the subprocess resumes)
    model, ema, opt, scaler = training_state(cfg)
    saves = [save_state(cfg, outdir, start - runs - 1 + i, model, ema, opt, scaler) for i in range(runs + 2)]
    size_mb = ckpt.ckpt_path(outdir, start).stat().st_size / 1e6
    del model, ema, opt
    log(f"preempt: save {median(saves):.2f} s for {size_mb:.0f} MB")

    verify = verify_experiment(ckpt.ckpt_path(outdir, start), 1 if args.quick else max(5, args.repeats))

    # 2 + 3. resume from the newest checkpoint and signal it, `runs` times
    trials = []
    for i in range(runs):
        latest = ckpt.list_checkpoints(outdir)[-1][0]
        r = resume_and_signal(overrides, outdir, latest, timeout=120 if args.quick else 600,
                              threads=args.threads)
        log(f"preempt: run {i + 1}/{runs}: first step after {r['popen_to_first_step_s']:.1f} s "
            f"(step {r['first_step_s']:.1f} s), signal in step {r['running_step_at_signal']}, "
            f"saved {r['checkpoint_step']}, rc {r['rc']}")
        trials.append(r)
    # end to end: the resume up to 'resumed from', previous vs shipped verify_state, alternating
    e2e = alternate({v: (lambda v=v: time_to_resumed_line(overrides, v, args.threads, 120 if args.quick else 600))
                     for v in ("before", "after")}, 1 if args.quick else args.repeats, warmup=0,
                    label="preempt resume-to-loaded")
    res.data["resume_to_loaded_experiment"] = {"seconds": e2e,
                                               "per_round": per_round_ratios(e2e["before"], e2e["after"])}

    lost = max(t["steps_lost"] for t in trials)
    rc_ok = all(t["rc"] == REQUEUE_EXIT for t in trials)
    overhead = median(t["resume_overhead_s"] for t in trials)
    total = median(t["popen_to_first_step_s"] for t in trials)
    step_s = median(t["first_step_s"] for t in trials)
    exit_s = median(t["signal_to_exit_s"] for t in trials)
    res.data["config"] = {"overrides": overrides, "runs": runs, "start_step": start, "OMP_NUM_THREADS": args.threads}
    res.data.update({"save_s": saves, "checkpoint_mb": size_mb, "trials": trials, "steps_lost_max": lost,
                     "all_exited_with_requeue_code": rc_ok, "median_resume_overhead_s": overhead,
                     "median_popen_to_first_step_s": total, "median_first_step_s": step_s,
                     "median_signal_to_exit_s": exit_s})
    size = "tiny" if args.quick else "base"
    quick = args.quick
    res.rows.append(Row(f"Checkpoint save, {size} full training state ({size_mb:.0f} MB)", fmt_s(median(saves)),
                        "-", None, f"runs: {', '.join(fmt_s(s) for s in saves)}"))
    res.rows.append(Row(f"Resume: process start to first new step ({size}, CPU), step time excluded",
                        f"{fmt_s(overhead)} (+ {fmt_s(step_s)} step = {fmt_s(total)})",
                        f"<= {TARGET_RESUME_S:g} s", None if quick else overhead <= TARGET_RESUME_S,
                        f"runs: {', '.join(fmt_s(t['resume_overhead_s']) for t in trials)}; 'resumed from' line after "
                        f"{fmt_s(median(t['popen_to_resumed_line_s'] or float('nan') for t in trials))}"))
    res.rows.append(Row("Steps lost per preemption (SIGUSR1 mid-step)",
                        f"{lost} (signal to exit {fmt_s(exit_s)}, exit code {REQUEUE_EXIT if rc_ok else 'WRONG'})",
                        f"<= {TARGET_LOST}", None if quick else (lost <= TARGET_LOST and rc_ok),
                        "; ".join(f"signal in step {t['running_step_at_signal']}, checkpoint at "
                                  f"{t['checkpoint_step']}" for t in trials)))
    res.data["verify_state_experiment"] = verify
    vt = verify["seconds"]
    res.rows.append(Row(f"Adopted change: t2v.checkpoint.verify_state numpy finiteness check ({size}, model + EMA): "
                        "before -> after",
                        f"{verify['speedup']:.1f}x ({fmt_s(median(vt['before']))} -> {fmt_s(median(vt['after']))} "
                        "per load)", "> 1x", None,
                        f"per-round {', '.join(f'{r:.1f}' for r in verify['per_round'])}; same error message on a "
                        "NaN checkpoint", group="adopted"))
    b, a = median(e2e["before"]), median(e2e["after"])
    res.rows.append(Row("  same, end to end: process start to 'resumed from' (checkpoint loaded): before -> after",
                        f"{b / a:.2f}x ({fmt_s(b)} -> {fmt_s(a)})", "> 1x", None,
                        f"per-round {', '.join(f'{r:.2f}' for r in res.data['resume_to_loaded_experiment']['per_round'])}",
                        group="adopted"))
    return res
