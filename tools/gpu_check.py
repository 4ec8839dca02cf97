"""`make gpu-check`: what has never run without a GPU, checked in one prepared script (under 8 minutes on one
H100/H200) that prints a summary table and writes it to bench/results/gpu_check.{md,json}.

Checks, each a real command line (the ones users run), in this order:
  setup    demo data, clip cache and caption embeddings (hash encoder: nothing to download)
  bf16     `base` trains 60 steps in bf16, a checkpoint at 30
  preempt  the same run, SIGUSR1 after step 40: saves and exits REQUEUE_EXIT; the resume ends where the straight run
           ends (bit-exact, or the measured largest difference: cuDNN's backward kernels are not deterministic)
  fp16     20 steps in fp16 with the grad scaler (its state saved in the checkpoint)
  compile  20 steps with train.compile=true
  sample   a 25-step DDIM sample from the bf16 run (grid + GIF)
  dit      the field's recipe at base size: the video transformer (model.arch=dit, cross-attention to caption
           tokens) with rectified flow, bf16 and train.compile=true, 30 steps on 8x32x32 clips (at patch 2 the token
           grid of 256 px latents); clips/s per GPU and peak GPU memory, then a 10-step Euler sample
  bench    `bench/run.py --only gpu` with the batch search capped so that everything fits
  wan      Wan 2.1 T2V-1.3B's transformer at its real size (random weights, bf16, activation checkpointing) on
           17 x 240 x 320 clips (MSR-VTT's own frames) as its latents: a LoRA and a full fine-tune through our
           train_step, peak GPU memory and clips/s of each (bench/finetune.py)
  fsdp     train.parallel=fsdp on one GPU (one shard, the code path of many) with train.deterministic=true: 30 steps
           straight, and signalled after step 15 then resumed from its sharded folder, bit-exact; MFU and model FLOPs

    python tools/gpu_check.py                  # on a GPU machine (make gpu-check installs first)
    python tools/gpu_check.py --rehearse       # the same flow on CPU with a tiny model: tests the script itself
    python tools/gpu_check.py --list           # the plan and each check's time budget, nothing run
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from t2v.runlog import REQUEUE_EXIT  # noqa: E402

# (name, seconds it may take at most on one H100/H200): 445 s together, so the script ends inside 8 minutes
# with room for Python start-up and the summary.
# wan: the 1.3B model made on the GPU, 4 LoRA and 4 full fine-tuning steps (its time taken from compile, bench, setup,
# fp16, dit and preempt, whose budgets were estimates with room)
# fsdp: three short runs of base (its time taken from every other budget but setup and sample)
BUDGET = {"setup": 40, "bf16": 45, "preempt": 55, "fp16": 30, "compile": 60, "sample": 25, "dit": 35, "bench": 55,
          "wan": 55, "fsdp": 50}
CHECKS = tuple(BUDGET)


@dataclass
class Result:
    name: str
    status: str = "skipped"  # ok | warn | FAIL | skipped
    seconds: float = 0.0
    detail: str = ""
    data: dict = field(default_factory=dict)


class CheckFailed(Exception):
    pass


@dataclass
class Plan:
    workdir: Path
    rehearse: bool  # CPU, tiny model, fp32: the flow and its parsing, not the GPU
    timeouts: dict

    def train_args(self, outdir: Path, *extra: str) -> list[str]:
        model = (["model.size=tiny", "data.frames=4", "data.size=16", "text.dim=64", "train.precision=fp32"]
                 if self.rehearse else ["model.size=base", "data.frames=8", "data.size=64", "text.dim=512",
                                        "train.precision=bf16"])
        return ["--config", str(REPO / "configs/default.yaml"), f"data.manifest={self.workdir / 'data/train.jsonl'}",
                "text.encoder=hash", "train.batch_size=4", "train.lr=2e-4", "train.warmup=10", "train.log_every=10",
                "train.ckpt_every=30", "train.sample_every=0", "train.val_every=0", "data.num_workers=2",
                f"train.outdir={outdir}", *model, *extra]


def run(cmd: list[str], timeout: float, log: Path) -> subprocess.CompletedProcess:
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        try:
            return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"timed out after {timeout:.0f} s (log {log})") from None


def py(*args: str) -> list[str]:
    return [sys.executable, *args]


def expect_rc(proc: subprocess.CompletedProcess | int, want: int, what: str, log: Path) -> None:
    rc = proc if isinstance(proc, int) else proc.returncode
    if rc != want:
        raise CheckFailed(f"{what} exited {rc}, expected {want} (log {log})")


def losses(outdir: Path) -> list[float]:
    rows = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["loss"] for r in rows if "loss" in r and "event" not in r]


def clips_per_s(outdir: Path) -> float:
    rows = [json.loads(line) for line in (outdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["clips_per_s"] for r in rows if "clips_per_s" in r]
    return rates[-1] if rates else float("nan")


def state_difference(a: dict, b: dict) -> float:
    """Largest absolute difference over the model, EMA and optimizer tensors of two checkpoints (0.0 = bit-exact)."""
    import torch

    worst = 0.0
    for key in ("model", "ema"):
        for name, t in a[key].items():
            worst = max(worst, (t.double() - b[key][name].double()).abs().max().item() if t.numel() else 0.0)
    for i, slots in a["optimizer"]["state"].items():
        for name, t in slots.items():
            t, u = torch.as_tensor(t).double(), torch.as_tensor(b["optimizer"]["state"][i][name]).double()
            worst = max(worst, (t - u).abs().max().item() if t.numel() else 0.0)
    return worst


def check_setup(plan: Plan, log: Path) -> Result:
    data = plan.workdir / "data"
    expect_rc(run(py("-m", "t2v.data", "demo", "--out", str(data)), plan.timeouts["setup"], log), 0, "demo data", log)
    args = plan.train_args(plan.workdir / "unused")
    expect_rc(run(py("-m", "t2v.data", "cache", *args), plan.timeouts["setup"], log), 0, "clip cache", log)
    expect_rc(run(py("-m", "t2v.text", "embed", "--no-progress", *args), plan.timeouts["setup"], log), 0, "embed", log)
    return Result("setup", "ok", detail=f"demo data and caches in {data}")


def check_bf16(plan: Plan, log: Path) -> Result:
    from t2v import checkpoint as ckpt

    out = plan.workdir / "straight"
    expect_rc(run(py("-m", "t2v.train", *plan.train_args(out, "train.steps=60")), plan.timeouts["bf16"], log),
              0, "training", log)
    steps = [s for s, _ in ckpt.list_checkpoints(out)]
    loss = losses(out)
    if steps != [30, 60] or not loss or not all(v == v and abs(v) < 1e3 for v in loss):
        raise CheckFailed(f"checkpoints {steps} (want [30, 60]), losses {loss}")
    precision = "fp32, CPU rehearsal" if plan.rehearse else "bf16"
    return Result("bf16", "ok", detail=f"60 steps ({precision}), checkpoints at 30 and 60, loss {loss[0]:.3f} -> {loss[-1]:.3f}, "
                                       f"{clips_per_s(out):.1f} clips/s", data={"losses": loss})


def signalled(cmd: list[str], after: int, deadline: float, log: Path) -> int:
    """Run ``cmd`` (a training with train.log_every=1), send SIGUSR1 once it logs step ``after``; its exit code."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}  (SIGUSR1 after step {after})\n")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            f.write(line)
            if line.startswith(f"step {after:06d}"):
                proc.send_signal(signal.SIGUSR1)
                break
        try:
            rest = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0]
        except subprocess.TimeoutExpired:
            proc.kill()
            raise CheckFailed(f"the signalled run did not end in time (log {log})") from None
        f.write(rest or "")
    return proc.returncode


def check_preempt(plan: Plan, log: Path) -> Result:
    from t2v import checkpoint as ckpt

    out = plan.workdir / "preempted"
    cmd = py("-m", "t2v.train", *plan.train_args(out, "train.steps=60", "train.log_every=1"))
    deadline = time.monotonic() + plan.timeouts["preempt"]
    expect_rc(signalled(cmd, 40, deadline, log), REQUEUE_EXIT, "the signalled run", log)
    stopped = ckpt.list_checkpoints(out)[-1][0]
    if stopped < 40:
        raise CheckFailed(f"SIGUSR1 after step 40 left its newest checkpoint at step {stopped}")
    expect_rc(run(cmd, max(1.0, deadline - time.monotonic()), log), 0, "the resume", log)
    diff = state_difference(ckpt.load_checkpoint(plan.workdir / "straight" / "ckpt_000060.pt"),
                            ckpt.load_checkpoint(out / "ckpt_000060.pt"))
    status = "ok" if diff == 0.0 else "warn"
    exact = "bit-exact" if diff == 0.0 else f"largest difference {diff:.3g} (nondeterministic GPU kernels)"
    return Result("preempt", status, detail=f"SIGUSR1 at step 40: saved step {stopped}, exit {REQUEUE_EXIT}; "
                                            f"resumed to 60, vs the straight run: {exact}",
                  data={"stopped_at": stopped, "max_abs_difference": diff})


def check_fsdp(plan: Plan, log: Path) -> Result:
    """train.parallel=fsdp on one GPU (one shard: the code path of many ranks) with train.deterministic=true: 30
    steps straight, and the same run signalled after step 15 and resumed from its sharded checkpoint folder; the
    two must end bit-exact. MFU against the card's peak."""
    from t2v import checkpoint as ckpt

    extra = ["train.parallel=fsdp", "train.deterministic=true", "train.steps=30", "train.ckpt_every=1000",
             "train.log_every=1", *(["train.peak_tflops=0.1"] if plan.rehearse else [])]
    deadline = time.monotonic() + plan.timeouts["fsdp"]
    straight, resumed = plan.workdir / "fsdp_straight", plan.workdir / "fsdp_resumed"
    proc = run(py("-m", "t2v.train", *plan.train_args(straight, *extra)), plan.timeouts["fsdp"], log)
    if proc.returncode != 0 and (straight / "train.log").is_file():
        said = [line for line in (straight / "train.log").read_text().splitlines() if "no deterministic kernel" in line]
        if said:  # an op of this model has no deterministic kernel on this card: worth knowing, not a broken run
            return Result("fsdp", "warn", detail=said[-1])
    expect_rc(proc, 0, "fsdp training", log)
    cmd = py("-m", "t2v.train", *plan.train_args(resumed, *extra))
    expect_rc(signalled(cmd, 15, deadline, log), REQUEUE_EXIT, "the signalled fsdp run", log)
    stopped, folder = ckpt.list_checkpoints(resumed)[-1]
    if not folder.is_dir():
        raise CheckFailed(f"the fsdp run saved {folder}, not a sharded folder")
    expect_rc(run(cmd, max(1.0, deadline - time.monotonic()), log), 0, "the fsdp resume", log)
    diff = state_difference(ckpt.load_checkpoint(straight / "ckpt_000030"), ckpt.load_checkpoint(resumed / "ckpt_000030"))
    rows = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines() if line.strip()]
    mfu = sorted(r["mfu"] for r in rows if "mfu" in r)
    model_line = next((line for line in (straight / "train.log").read_text().splitlines()
                       if "model TFLOP a step" in line), "")
    flops = model_line.rsplit("| ", 1)[-1]
    utilisation = f"MFU {100 * mfu[len(mfu) // 2]:.1f}% (median of {len(mfu)} steps)" if mfu else \
        "no MFU (a card the peak table does not know: set train.peak_tflops)"
    exact = "bit-exact" if diff == 0.0 else f"largest difference {diff:.3g}"
    return Result("fsdp", "ok" if diff == 0.0 else "warn",
                  detail=f"one shard, deterministic kernels: SIGUSR1 at step 15 saved folder {folder.name}, resumed "
                         f"to 30, vs the straight run: {exact}; {flops}; {utilisation}; "
                         f"{clips_per_s(straight):.1f} clips/s",
                  data={"stopped_at": stopped, "max_abs_difference": diff, "mfu": mfu, "model_line": model_line})


def train_20_steps(plan: Plan, log: Path, name: str, setting: str) -> Path:
    """20 steps with one setting changed (a checkpoint at the end), in workdir/<name>; returns that run folder."""
    out = plan.workdir / name
    args = plan.train_args(out, "train.steps=20", "train.ckpt_every=20", setting)
    expect_rc(run(py("-m", "t2v.train", *args), plan.timeouts[name], log), 0, f"training with {setting}", log)
    return out


def check_fp16(plan: Plan, log: Path) -> Result:
    import torch

    if plan.rehearse:
        return Result("fp16", "skipped", detail="CPU rehearsal: fp16 autocast and the grad scaler need CUDA")
    out = train_20_steps(plan, log, "fp16", "train.precision=fp16")
    state = torch.load(out / "ckpt_000020.pt", map_location="cpu", weights_only=True)
    scale = (state.get("scaler") or {}).get("scale")
    loss = losses(out)
    if not scale or not all(v == v for v in loss):
        raise CheckFailed(f"grad scaler state {state.get('scaler')}, losses {loss}")
    return Result("fp16", "ok", detail=f"20 steps, grad scale {float(scale):g}, loss {loss[-1]:.3f}")


def check_compile(plan: Plan, log: Path) -> Result:
    if plan.rehearse:
        return Result("compile", "skipped", detail="CPU rehearsal: torch.compile is checked on the GPU")
    out = train_20_steps(plan, log, "compile", "train.compile=true")
    return Result("compile", "ok", detail=f"20 compiled steps, last window {clips_per_s(out):.1f} clips/s "
                                          f"(eager: see bf16)", data={"losses": losses(out)})


def check_sample(plan: Plan, log: Path) -> Result:
    out = plan.workdir / "samples"
    cmd = py("-m", "t2v.sample", "--ckpt", str(plan.workdir / "straight"), "--out", str(out), "--steps", "25",
             "--prompt", "a red circle moving right", "--prompt", "a blue square moving up")
    expect_rc(run(cmd, plan.timeouts["sample"], log), 0, "sampling", log)
    made = sorted(p.name for p in out.iterdir())
    if "grid.png" not in made or len([m for m in made if m.endswith(".gif")]) != 2:
        raise CheckFailed(f"sampling wrote {made}")
    return Result("sample", "ok", detail=f"25 DDIM steps, 2 prompts: {', '.join(made)}")


def check_dit(plan: Plan, log: Path) -> Result:
    out = plan.workdir / "dit"
    recipe = ["model.arch=dit", "diffusion.objective=flow", "diffusion.shift=3", "model.cross_attention=true",
              "text.tokens=true", "train.steps=30", "train.ckpt_every=30", "train.log_every=10"]
    if not plan.rehearse:
        recipe += ["data.size=32", "train.compile=true", "train.batch_size=8"]
    args = plan.train_args(out, *recipe)
    expect_rc(run(py("-m", "t2v.text", "embed", "--no-progress", *args), plan.timeouts["dit"], log), 0, "token embed", log)
    expect_rc(run(py("-m", "t2v.train", *args), plan.timeouts["dit"], log), 0, "dit + flow training", log)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    memory = max((r.get("gpu_mem_gib", 0.0) for r in rows), default=0.0)
    loss = losses(out)
    if not loss or not all(v == v for v in loss):
        raise CheckFailed(f"losses {loss}")
    cmd = py("-m", "t2v.sample", "--ckpt", str(out), "--out", str(out / "samples"), "--steps", "10",
             "--prompt", "a red circle moving right")
    expect_rc(run(cmd, plan.timeouts["dit"], log), 0, "Euler sampling", log)
    return Result("dit", "ok", detail=f"30 steps ({'fp32, CPU rehearsal' if plan.rehearse else 'bf16, compiled'}), "
                                      f"{clips_per_s(out):.1f} clips/s, peak GPU memory {memory:.2f} GiB, "
                                      f"loss {loss[0]:.3f} -> {loss[-1]:.3f}; 10 Euler steps sampled",
                  data={"clips_per_s": clips_per_s(out), "peak_gib": memory, "losses": loss})


def check_bench(plan: Plan, log: Path) -> Result:
    out = plan.workdir / "bench"
    cmd = py(str(REPO / "bench/run.py"), "--only", "gpu", "--out", str(out), "--name", "gpu-check", "--repeats", "1",
             "--max-batch", "64", "--gpu-batches", "2,32", *(["--quick"] if plan.rehearse else []))
    expect_rc(run(cmd, plan.timeouts["bench"], log), 0, "bench/run.py --only gpu", log)
    found = sorted(out.glob("gpu-check*.json"))
    if not found:
        raise CheckFailed(f"no bench result in {out}")
    gpu = json.loads(found[-1].read_text())["sections"]["gpu"]
    detail = "; ".join(f"{r['name']}: {r['measured']}" for r in gpu["rows"]) or f"skipped: {gpu.get('skipped')}"
    return Result("bench", "ok", detail=detail, data={"file": str(found[-1])})


def check_wan(plan: Plan, log: Path) -> Result:
    out = plan.workdir / "wan.json"
    cmd = py("-m", "bench.finetune", *(["--rehearse"] if plan.rehearse else []))
    with open(out, "w") as f, open(log, "a") as errors:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=errors, timeout=plan.timeouts["wan"], check=False)
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"timed out after {plan.timeouts['wan']:.0f} s (log {log})") from None
    expect_rc(proc, 0, "python -m bench.finetune", log)
    got = json.loads(out.read_text().strip().splitlines()[-1])
    parts = [f"{mode} ({got[mode]['trained'] / 1e6:,.1f} M of {got[mode]['parameters'] / 1e6:,.0f} M trained): "
             f"{got[mode]['clips_per_s']:.2f} clips/s, peak {got[mode]['peak_gib']:.1f} GiB" for mode in ("lora", "full")]
    bad = [m for m in ("lora", "full") if not got[m]["loss"] == got[m]["loss"]]
    if bad:
        raise CheckFailed(f"non-finite loss in {', '.join(bad)}: {got}")
    return Result("wan", "ok", detail=f"{got['config']}, latents {'x'.join(map(str, got['latent']))}: " + "; ".join(parts),
                  data=got)


RUNNERS = {"setup": check_setup, "bf16": check_bf16, "preempt": check_preempt, "fp16": check_fp16,
           "compile": check_compile, "sample": check_sample, "dit": check_dit, "bench": check_bench,
           "wan": check_wan, "fsdp": check_fsdp}
NEEDS = {"preempt": "bf16", "sample": "bf16"}  # compares with / samples from the bf16 run


def summary(results: list[Result], header: str) -> str:
    lines = [f"# GPU check: {header}", "", "| check | result | seconds | detail |", "| --- | --- | ---: | --- |"]
    lines += [f"| {r.name} | {r.status} | {r.seconds:.0f} | {r.detail.replace('|', '/')} |" for r in results]
    failed = [r.name for r in results if r.status == "FAIL"]
    lines += ["", f"**{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}** "
                  f"({sum(r.seconds for r in results):.0f} s)"]
    return "\n".join(lines) + "\n"


def run_checks(plan: Plan, only: list[str], log: Path) -> list[Result]:
    results: dict[str, Result] = {}
    for name in CHECKS:
        if name not in only:
            continue
        need = "setup" if name != "setup" else None
        for dep in (need, NEEDS.get(name)):
            if dep and dep in results and results[dep].status == "FAIL":
                results[name] = Result(name, "skipped", detail=f"needs {dep}, which failed")
                break
        else:
            start = time.monotonic()
            try:
                results[name] = RUNNERS[name](plan, log)
            except CheckFailed as e:
                results[name] = Result(name, "FAIL", detail=str(e))
            results[name].seconds = time.monotonic() - start
        r = results[name]
        print(f"[gpu-check] {name}: {r.status} ({r.seconds:.0f} s) {r.detail}", flush=True)
    return list(results.values())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)} "
                                                            "(setup always runs first)")
    p.add_argument("--workdir", default="/tmp/t2v-gpu-check", help="scratch folder (emptied first)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="folder for gpu_check.md and .json")
    p.add_argument("--rehearse", action="store_true", help="run the flow on CPU with a tiny model (tests the script)")
    p.add_argument("--list", action="store_true", help="print the plan and each check's time budget, run nothing")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in CHECKS]
    if unknown:
        p.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    args.only = ["setup", *[s for s in only if s != "setup"]]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.list:
        for name in CHECKS:
            print(f"{name:8s} {'runs' if name in args.only else 'skipped':8s} at most {BUDGET[name]} s")
        print(f"total at most {sum(BUDGET[n] for n in args.only)} s")
        return 0
    import shutil

    import torch

    if not args.rehearse and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); run it on a GPU node, or "
              "--rehearse to try the flow on CPU", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    # a rehearsal trains a tiny model on CPU: give it more time per check than the GPU budget
    plan = Plan(work, args.rehearse, {k: v * (4 if args.rehearse else 1) for k, v in BUDGET.items()})
    log = work / "gpu_check.log"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = "CPU rehearsal (tiny model, fp32)" if args.rehearse else torch.cuda.get_device_name(0)
    header = f"{device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M')}"
    results = run_checks(plan, args.only, log)
    text = summary(results, header)
    print("\n" + text, end="")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "gpu_check_rehearsal" if args.rehearse else "gpu_check"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps({"device": device, "torch": torch.__version__,
                                                   "results": [asdict(r) for r in results]}, indent=2) + "\n")
    print(f"written: {out / (stem + '.md')}, {out / (stem + '.json')}; commands and output: {log}")
    return 1 if any(r.status == "FAIL" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
