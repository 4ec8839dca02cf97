"""Smoke test of the benchmarks (bench/run.py): the real entry point, every section, tiny sizes (--quick),
so the benchmark code cannot rot unnoticed. Takes ~10 s; its numbers mean nothing and are not checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"train", "data", "text", "preempt", "gpu", "exp"}


def test_bench_quick_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "MANIFEST", "OUTDIR", "STEPS", "BS")}
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, f"bench/run.py --quick failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"

    results = list(tmp_path.glob("bench-quick-*.json"))
    assert len(results) == 1, list(tmp_path.iterdir())
    record = json.loads(results[0].read_text())
    assert set(record["sections"]) == SECTIONS
    for name, sec in record["sections"].items():
        assert sec["error"] is None, f"{name}: {sec['error']}"
    machine = record["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and "platform" in machine

    data = record["sections"]["data"]
    assert data["demo"]["identical_pixels"] and data["demo"]["median_clips_per_s"]["cache"] > 0
    assert data["to_model_before_after"]["bit_identical"]
    pre = record["sections"]["preempt"]
    assert pre["all_exited_with_requeue_code"] and pre["steps_lost_max"] <= 1
    assert pre["trials"][0]["popen_to_first_step_s"] > 0 and pre["checkpoint_mb"] > 0
    gpu = record["sections"]["gpu"]
    if gpu["skipped"]:  # no CUDA: the pure parts still ran on CPU
        assert gpu["selftest"]["tiny_step_flops"]["total"] > 0
    train = record["sections"]["train"]
    if not train["skipped"]:  # diffusers is an optional extra (.[bench])
        assert train["params"]["ours"] > 0 and train["ratio"] > 0
        assert len(train["seconds_per_step"]["ours"]) == len(train["seconds_per_step"]["diffusers"]) == 1
    assert record["sections"]["text"]["ratio"] > 0

    md = (tmp_path / "latest.md").read_text()
    assert "| Benchmark | Measured | Target | Result |" in md
    assert "Benchmark" in proc.stdout and "results:" in proc.stdout
    assert elapsed < 60, f"the smoke test is meant to take seconds, took {elapsed:.0f} s"


def test_latest_md_carries_over_sections_not_run(tmp_path):
    """`--only` runs: latest.md keeps the other sections' rows from the newest earlier full-size JSON (never a
    --quick one), marked with that run's timestamp; adopted changes and candidates get tables of their own."""
    import types

    sys.path.insert(0, str(REPO))
    from bench.common import Row, SectionResult
    from bench.run import carry_over, markdown

    def record(stamp, quick, rows):
        return {"name": "bench", "timestamp": stamp, "quick": quick,
                "sections": {"train": {"name": "train", "skipped": None, "error": None, "seconds": 1.0,
                                       "rows": rows},
                             "gpu": {"name": "gpu", "skipped": "no CUDA GPU", "error": None, "seconds": 0.0,
                                     "rows": []}}}

    old = [{"name": "Training step", "measured": "8.03x", "target": ">= 3x", "verdict": "PASS", "detail": "d"},
           {"name": "Old proposal", "measured": "1.1x", "target": "> 1x", "verdict": "info", "proposal": True}]
    (tmp_path / "bench-20260101-000000.json").write_text(json.dumps(record("20260101-000000", False, old)))
    (tmp_path / "bench-quick-20270101-000000.json").write_text(json.dumps(record("20270101-000000", True, [])))
    carried, sources = carry_over(tmp_path, ["train", "text", "gpu"])
    assert [r.name for r in carried] == ["train", "gpu"]  # nothing holds `text`
    assert sources == {"train": "bench-20260101-000000.json", "gpu": "bench-20260101-000000.json"}
    train = carried[0]
    assert train.rows[0].passed is True and train.rows[1].group == "candidate"
    assert carried[1].skipped == "no CUDA GPU"

    now = SectionResult("exp", rows=[Row("Adopted change: x: before -> after", "1.2x", "> 1x", None, group="adopted"),
                                     Row("y: shipped vs y", "1.1x", "> 1x", None, group="candidate")])
    info = {"cpu_count": 2, "cpu_model": "cpu", "gpu": None, "torch": "t", "diffusers": "d", "torch_threads": 2,
            "load_average_start": None, "load_average_end": None}
    md = markdown([train, carried[1], now], info, types.SimpleNamespace(quick=False, repeats=3), "stamp", sources)
    assert "| Training step [run 20260101-000000] | 8.03x | >= 3x | PASS |" in md
    assert "| gpu [run 20260101-000000] | skipped: no CUDA GPU | - | skipped |" in md
    assert "| Adopted change to t2v, measured before -> after | Measured | Target | Result |" in md
    assert "| Adopted change: x: before -> after | 1.2x | > 1x | info |" in md
    assert md.index("Adopted change to t2v") < md.index("| Candidate change to t2v")
    assert "train, gpu from bench-20260101-000000.json" in md
