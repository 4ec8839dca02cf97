"""Smoke test of the benchmarks (bench/run.py): the real entry point, every section, tiny sizes (--quick),
so the benchmark code cannot rot unnoticed. Takes ~10 s; its numbers mean nothing and are not checked."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTIONS = {"train", "data", "text", "preempt", "gpu", "exp", "latent", "scale", "dit", "finetune", "sharded"}


def test_bench_quick_runs_every_section(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("CONFIG", "MANIFEST", "OUTDIR", "STEPS", "BS")}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
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
    if not train["skipped"]:  # the peers are optional: diffusers (.[bench]), video-diffusion-pytorch (its row says how)
        check_train_rows(train)
    assert record["sections"]["text"]["ratio"] > 0
    demo = record["sections"]["exp"]["demo_model"]  # the demo's model before -> after each adopted change
    params = demo["params"]
    assert all(demo[k]["speedup"] > 0 for k in ("patches", "downsample_time", "temporal_conv2d"))
    assert len({params["before"], params["patched"], params["after"]}) == 3  # three models
    assert params["conv3d_temporal"] == params["after"]  # the same model, its temporal conv called another way

    md = (tmp_path / "latest.md").read_text()
    assert "| Benchmark | Measured | Target | Result |" in md
    assert "Benchmark" in proc.stdout and "results:" in proc.stdout
    assert record["quick"] is True  # tiny sizes, one round: a smoke test, its numbers are not judged


def check_train_rows(train: dict) -> None:
    """The train section's three ratio rows: each measured from both sides' rounds, or saying why not."""
    keys = ["diffusers", "cross_attention", "vdp"]  # pooled vs diffusers, cross-attention vs diffusers, vs vdp
    assert len(train["rows"]) == len(keys)
    for key, row in zip(keys, train["rows"]):
        c = train["comparisons"][key]
        if "skipped" in c:
            assert row["verdict"] == "skipped" and c["skipped"] in row["measured"]
            assert "not importable" in row["measured"]
            continue
        assert c["params"]["ours"] > 0 and c["params"]["peer"] > 0 and c["ratio"] > 0, (key, c)
        assert len(train["seconds_per_step"][c["ours"]]) == len(train["seconds_per_step"][c["peer"]]) == 1
        assert row["verdict"] == "info" and f"{c['ratio']:.2f}x" in row["measured"]  # --quick: nothing judged
    if "ratio" in train:  # the original row's keys, as earlier result files have them
        assert train["ratio"] == train["comparisons"]["diffusers"]["ratio"] and train["params"]["peer"] > 0
    if "ours_xattn" in train["params_all"]:  # cross_attention=True really built the cross-attention blocks
        assert train["params_all"]["ours_xattn"] > train["params_all"]["ours"]
        assert train["comparisons"]["cross_attention"]["peer"] == "diffusers"


def test_train_rows_say_why_a_peer_is_missing(monkeypatch):
    """video-diffusion-pytorch not importable: its row is `skipped` with the reason, never a number; the
    diffusers rows (where diffusers is installed) are still measured."""
    import types

    sys.path.insert(0, str(REPO))
    import bench.train_bench as tb
    from bench.common import Threads
    from bench.harness import _NoTorchvision

    monkeypatch.setitem(sys.modules, "video_diffusion_pytorch", None)  # import now raises ImportError
    why = tb.vdp_available()
    assert why and "video-diffusion-pytorch is not importable" in why and "--no-deps" in why
    monkeypatch.setattr(tb, "vdp_available", lambda: why)
    with Threads(1):  # as bench/run.py --quick does: tiny ops on a shared machine
        res = tb.bench_train(types.SimpleNamespace(quick=True, model_size="base", repeats=1))
    data = {"rows": [{"name": r.name, "measured": r.measured, "verdict": r.verdict} for r in res.rows], **res.data}
    if res.skipped:  # diffusers is not installed either: nothing to time
        assert why in res.skipped and not res.rows
        return
    assert "vdp" not in data["seconds_per_step"] and data["comparisons"]["vdp"] == {"skipped": why}
    check_train_rows(data)
    assert not isinstance(sys.modules.get("torchvision"), _NoTorchvision)  # it never outlives an import


def test_peers_match_our_params_at_full_sizes():
    """At the sizes `make bench` measures (base, and large), every peer is within ±15 % of the parameters of the
    model it is compared with: built only, nothing run."""
    sys.path.insert(0, str(REPO))
    from bench.harness import build_ours, build_peer, build_vdp, diffusers_available, vdp_available
    from bench.train_bench import PARAM_TOLERANCE
    from t2v.models import count_params

    def close(peer, ours):
        return abs(peer / ours - 1) <= PARAM_TOLERANCE

    for size in ("base", "large"):
        ours = count_params(build_ours(size))
        if not diffusers_available():
            peer = count_params(build_peer(size))
            assert close(peer, ours), (size, peer, ours)
            xattn = count_params(build_ours(size, cross_attention=True))
            assert xattn > ours and close(peer, xattn), (size, peer, xattn)
        if not vdp_available():
            vdp = count_params(build_vdp(size))
            assert close(vdp, ours), (size, vdp, ours)


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
           {"name": "Old proposal", "measured": "1.1x", "target": "> 1x", "verdict": "info", "proposal": True},
           {"name": "Training step, vs a peer", "measured": "not measured: x is not importable", "target": "-",
            "verdict": "skipped"}]
    (tmp_path / "bench-20260101-000000.json").write_text(json.dumps(record("20260101-000000", False, old)))
    (tmp_path / "bench-quick-20270101-000000.json").write_text(json.dumps(record("20270101-000000", True, [])))
    carried, sources = carry_over(tmp_path, ["train", "text", "gpu"])
    assert [r.name for r in carried] == ["train", "gpu"]  # nothing holds `text`
    assert sources == {"train": "bench-20260101-000000.json", "gpu": "bench-20260101-000000.json"}
    train = carried[0]
    assert train.rows[0].passed is True and train.rows[1].group == "candidate"
    assert train.rows[2].skipped and train.rows[2].passed is None and train.rows[2].verdict == "skipped"
    assert carried[1].skipped == "no CUDA GPU"

    now = SectionResult("exp", rows=[Row("Adopted change: x: before -> after", "1.2x", "> 1x", None, group="adopted"),
                                     Row("y: shipped vs y", "1.1x", "> 1x", None, group="candidate")])
    info = {"cpu_count": 2, "cpu_model": "cpu", "gpu": None, "torch": "t", "diffusers": "d", "torch_threads": 2,
            "load_average_start": None, "load_average_end": None}
    md = markdown([train, carried[1], now], info, types.SimpleNamespace(quick=False, repeats=3), "stamp", sources)
    assert "| Training step [run 20260101-000000] | 8.03x | >= 3x | PASS |" in md
    assert "| Training step, vs a peer [run 20260101-000000] | not measured: x is not importable | - | skipped |" in md
    assert "| gpu [run 20260101-000000] | skipped: no CUDA GPU | - | skipped |" in md
    assert "| Adopted change to t2v, measured before -> after | Measured | Target | Result |" in md
    assert "| Adopted change: x: before -> after | 1.2x | > 1x | info |" in md
    assert md.index("Adopted change to t2v") < md.index("| Candidate change to t2v")
    assert "train, gpu from bench-20260101-000000.json" in md


def test_demo_recipes_time_to_target_and_table():
    from bench.demo_recipes import RECIPES, table, with_target

    evals = [{"step": s, "train_s": 10.0 * s, "color": c, "shape": sh, "motion": m, "all": 0.0, "background": 0.05}
             for s, c, sh, m in [(100, 0.5, 0.3, 0.1), (200, 1.0, 0.4, 0.95), (300, 0.96, 0.8, 0.9), (400, 1.0, 0.9, 1.0)]]
    r = with_target({"recipe": "x", "overrides": ["diffusion.shift=8"], "steps": 400, "step_s": 10.0, "evals": evals})
    assert (r["steps_to_motion"], r["time_to_motion_s"]) == (200, 2000.0)  # motion first
    assert (r["steps_to_target"], r["time_to_target_s"]) == (300, 3000.0)  # all three, shape >= 75%
    md = table([r])
    assert "| x | diffusion.shift=8 | 10.00 | 400 |" in md and "33.3 min (step 200)" in md and "50.0 min (step 300)" in md
    assert RECIPES["demo"] == [] and all(o.count("=") == 1 for v in RECIPES.values() for o in v)


def test_recipe_sweep_counts_a_target_only_once_it_holds_and_names_variants():
    from bench.recipe_sweep import RECIPES, label, main, reached, tables

    def ev(step, circle, down, bg=0.04):
        per = lambda names, v: dict.fromkeys(names, 1.0) | v  # noqa: E731
        return {"step": step, "val_loss": 0.1, "color": 1.0, "shape": 1.0, "motion": 1.0, "background": bg,
                "per_color": per(("red", "blue"), {}), "per_shape": per(("circle", "square"), {"circle": circle}),
                "per_motion": per(("left", "down"), {"down": down})}

    # step 200 meets every target but step 400 misses circles again: only from step 600 on does it hold
    evals = [ev(200, 0.95, 1.0), ev(400, 0.80, 1.0), ev(600, 0.94, 0.96), ev(800, 1.0, 1.0)]
    assert reached(evals) == 600 and reached(evals, ("color", "motion")) == 200
    assert reached([ev(200, 1.0, 1.0, bg=0.06)]) is None  # the background is a target too
    run = {"recipe": label("unet_flow", "wide"), "seed": 0, "step_s": 0.5, "evals": evals}
    md = tables([run, {**run, "seed": 1}])
    assert "| unet_flow+wide | 0.500 | 2 | 100 / 100 (median 100) | 300 / 300 (median 300) |" in md
    assert label("unet_flow", "") == "unet_flow"
    # every flow recipe pins its training times and every recipe its guidance: a demo.yaml change cannot move them
    assert all("train.guidance=5" in o for o in RECIPES.values())
    assert all("diffusion.logit_std=1" in o for n, o in RECIPES.items() if n.endswith("flow"))
    with pytest.raises(SystemExit):  # an --extra without --tag would overwrite the recipe's own results
        main(["--extra", "diffusion.shift=4", "--recipes", "unet_flow"])


def test_the_benchmark_times_the_training_step_t2v_train_runs():
    """bench/harness.TrainStep calls t2v.train's train_step: one step of it equals one step of the step function
    driven by hand with the same state, to the bit (so `make bench` cannot drift from training)."""
    import copy

    import torch

    from bench import harness
    from t2v import train as T

    assert harness.train_step is T.train_step
    inp = harness.Inputs(batch=2, frames=2, size=16, text_dim=32)
    bench_step = harness.TrainStep(harness.build_ours("tiny", 32), harness.forward_ours, inp.clip("cpu"),
                                   inp.pooled("cpu"))
    by_hand = copy.deepcopy(bench_step.state)
    by_hand.net = by_hand.model  # the deepcopy's own model (net and model are one object without compile)
    losses = [bench_step() for _ in range(2)]
    for step in range(2):
        assert T.train_step(by_hand, step, inp.clip("cpu"), inp.pooled("cpu")).loss == losses[step]
    for a, b in zip(bench_step.model.parameters(), by_hand.model.parameters()):
        assert torch.equal(a, b)
