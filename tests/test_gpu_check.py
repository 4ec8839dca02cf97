"""tools/gpu_check.py (`make gpu-check`): its CPU-side parts here; the GPU run's output is in bench/results/."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from runs import REPO
from tools import gpu_check as G


def test_the_plan_fits_in_eight_minutes_and_lists_every_check(capsys):
    assert sum(G.BUDGET.values()) <= 450 and set(G.BUDGET) == set(G.RUNNERS)
    assert G.main(["--list", "--only", "bf16,sample"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["setup", "runs"] and out[-1] == f"total at most {sum(G.BUDGET[n] for n in ('setup', 'bf16', 'sample'))} s"
    assert [line.split()[1] for line in out[:-1]] == ["runs" if n in ("setup", "bf16", "sample") else "skipped"
                                                      for n in G.CHECKS]


def test_unknown_checks_are_refused_with_the_valid_names(capsys):
    with pytest.raises(SystemExit) as e:
        G.parse_args(["--only", "bf16,warp"])
    assert e.value.code == 2 and "unknown check(s) warp; choose from setup, bf16" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the refusal on a machine without CUDA")
def test_without_a_gpu_it_says_so_and_runs_nothing(tmp_path, capsys):
    assert G.main(["--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "out")]) == 2
    assert "no CUDA GPU here" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_failed_check_skips_what_needs_it_and_fails_the_summary(tmp_path, monkeypatch):
    def boom(plan, log):
        raise G.CheckFailed("training exited 1, expected 0")

    ran = []
    monkeypatch.setattr(G, "RUNNERS", {**{n: (lambda plan, log, n=n: ran.append(n) or G.Result(n, "ok"))
                                          for n in G.CHECKS}, "bf16": boom})
    plan = G.Plan(tmp_path, rehearse=True, timeouts=G.BUDGET)
    results = G.run_checks(plan, list(G.CHECKS), tmp_path / "log")
    status = {r.name: r.status for r in results}
    assert status == {"setup": "ok", "bf16": "FAIL", "preempt": "skipped", "fp16": "ok", "compile": "ok",
                      "sample": "skipped", "dit": "ok", "bench": "ok", "wan": "ok", "fsdp": "ok"}
    assert ran == ["setup", "fp16", "compile", "dit", "bench", "wan", "fsdp"]
    text = G.summary(results, "test")
    assert "| bf16 | FAIL |" in text and "**FAILED: bf16**" in text and "needs bf16, which failed" in text


def test_state_difference_is_zero_only_for_identical_states():
    a = {"model": {"w": torch.ones(3)}, "ema": {"w": torch.ones(3)}, "optimizer": {"state": {0: {"m": torch.zeros(2)}}}}
    b = {"model": {"w": torch.tensor([1.0, 1.0, 1.5])}, "ema": {"w": torch.ones(3)},
         "optimizer": {"state": {0: {"m": torch.zeros(2)}}}}
    assert G.state_difference(a, a) == 0.0 and G.state_difference(a, b) == 0.5


@pytest.mark.slow
def test_rehearsal_runs_the_whole_flow_on_cpu(tmp_path):
    """The script's real flow (demo data, training, SIGUSR1 + resume, sampling, bench) on CPU with a tiny model."""
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--rehearse", "--workdir", str(tmp_path / "w"),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = (tmp_path / "out" / "gpu_check_rehearsal.md").read_text()
    assert "**all checks passed**" in text
    assert "| preempt | ok |" in text and "bit-exact" in text  # on CPU the resume is exact
    assert "| fp16 | skipped |" in text and "| sample | ok |" in text
    assert "| dit | ok |" in text and "10 Euler steps sampled" in text
    assert "| wan | ok |" in text and "lora (0.0 M of 0 M trained)" in text
    fsdp = next(line for line in text.splitlines() if line.startswith("| fsdp |"))
    assert "| fsdp | ok |" in fsdp and "saved folder ckpt_0000" in fsdp and "vs the straight run: bit-exact" in fsdp
    assert "model TFLOP a step" in fsdp and "MFU" in fsdp and "% (median of 30 steps)" in fsdp
