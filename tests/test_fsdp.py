"""train.parallel=fsdp on CPU with gloo: FSDP2 trains what DDP trains at the same global batch; its checkpoints are
folders every rank writes (t2v.sharded) that resume bit-exactly, survive a kill -9 inside a save, resume on another
world size, convert to a single file and back exactly, and name a missing rank's file. Also the facts a run reports
(model FLOPs, MFU), train.deterministic, and clean exits of multi-rank processes.

Preemption and requeue of FSDP jobs on the test Slurm are in tests/test_slurm_jobs.py and test_slurm_two_nodes.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn

from runs import REPO, assert_close, assert_states_equal, finish, free_port, launch, load, prepare, tiny_config
from t2v import checkpoint as ckpt_io
from t2v import flops
from t2v import sharded

STEPS = 8
COMMON = (f"train.steps={STEPS}", "train.ckpt_every=4", "train.log_every=4", "train.batch_size=2")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    prepare(tiny_config(d, d / "unused"))
    return d


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    """Two ranks, global batch 4, trained uninterrupted with DDP and with FSDP (checkpoints at steps 4 and 8)."""
    base = tmp_path_factory.mktemp("straight")
    runs = {}
    for parallel in ("ddp", "fsdp"):
        results = finish(launch(data_dir, base / parallel, 2, *COMMON, f"train.parallel={parallel}",
                                "train.peak_tflops=0.001"))
        assert [rc for rc, _ in results] == [0, 0], results
        runs[parallel] = base / parallel
    return runs


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_fsdp_trains_what_ddp_trains_at_the_same_global_batch(straight):
    ddp, fsdp = straight["ddp"], straight["fsdp"]
    log = (fsdp / "train.log").read_text()
    assert "| fsdp |" in log and "global batch 4 = 2 x 2" in log
    folder = fsdp / f"ckpt_{STEPS:06d}"
    assert f"saved {folder}\n" in log
    assert sorted(p.name for p in folder.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]
    assert [s for s, _ in ckpt_io.list_checkpoints(fsdp)] == [4, 8]
    a, b = load(ddp / f"ckpt_{STEPS:06d}.pt"), ckpt_io.load_checkpoint(folder)
    assert_close(a, b)
    assert losses(ddp) == pytest.approx(losses(fsdp), abs=1e-5)
    # each rank's RNG under its own key (one key for all would keep one rank's state for every rank)
    assert sorted(b["rng_ranks"]) == ["rank0", "rank1"]
    # MFU beside the loss in every log window (train.peak_tflops stands in for a card's peak on CPU)
    windows = [r for r in map(json.loads, (fsdp / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert windows and all(r["mfu"] > 0 for r in windows)
    assert "model TFLOP a step (MFU against 0.001 TFLOP/s a rank)" in log


@pytest.mark.slow
def test_two_ranks_resume_on_one_keeping_the_global_batch(data_dir, straight, tmp_path):
    """A run saved on 2 ranks goes on on 1, sharded or not, from a folder or a file: the same training to float
    order."""
    ends = {}
    for parallel in ("ddp", "fsdp"):
        run = tmp_path / parallel
        shutil.copytree(straight[parallel], run)
        (rc, out), = finish(launch(data_dir, run, 1, *COMMON[1:], "train.steps=12", "train.batch_size=1",
                                   f"train.parallel={parallel}"))
        assert rc == 0, out
        assert f"at step {STEPS}" in out and "world size 2 -> 1: global batch 4 kept, 4 per rank" in out, out
        assert "not bit-exact" in out
        assert ("train.parallel=fsdp on one process: one shard" in out) == (parallel == "fsdp")
        ends[parallel] = ckpt_io.load_checkpoint(ckpt_io.list_checkpoints(run)[-1][1])
    assert ends["ddp"]["step"] == ends["fsdp"]["step"] == 12
    assert_close(ends["ddp"], ends["fsdp"])


@pytest.mark.slow
def test_kill_9_inside_a_sharded_save_leaves_the_previous_checkpoint_which_resumes_exactly(data_dir, straight,
                                                                                          tmp_path):
    run = tmp_path / "run"
    os.environ[ckpt_io.SAVE_PAUSE_ENV] = "3"  # launch() copies the environment: every save waits before its rename
    try:
        procs = launch(data_dir, run, 2, *COMMON, "train.parallel=fsdp")
    finally:
        del os.environ[ckpt_io.SAVE_PAUSE_ENV]
    torn = sharded.tmp_dir(run / f"ckpt_{STEPS:06d}")
    deadline = time.monotonic() + 300
    while not (torn / ".metadata").is_file():  # every rank's shards are written: the save is nearly done
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), finish(procs)
        time.sleep(0.05)
    for p in procs:
        p.kill()
    finish(procs)
    assert [s for s, _ in ckpt_io.list_checkpoints(run)] == [4]  # the killed save has no final name

    results = finish(launch(data_dir, run, 2, *COMMON, "train.parallel=fsdp"))
    assert [rc for rc, _ in results] == [0, 0], results
    assert f"resumed from {run / 'ckpt_000004'} at step 4" in results[0][1]
    assert not torn.exists()
    saved = ckpt_io.load_checkpoint(run / f"ckpt_{STEPS:06d}")
    ref = ckpt_io.load_checkpoint(straight["fsdp"] / f"ckpt_{STEPS:06d}")
    assert_states_equal(saved, ref)  # same world size: bit for bit, every rank's RNG too
    for r in ("rank0", "rank1"):
        assert torch.equal(saved["rng_ranks"][r]["torch"], ref["rng_ranks"][r]["torch"])


@pytest.mark.slow
def test_export_converts_a_sharded_checkpoint_to_a_file_and_back_exactly(straight, tmp_path):
    from t2v import export

    folder = straight["fsdp"] / f"ckpt_{STEPS:06d}"
    assert export.main([str(folder), "--format", "file", "--out", str(tmp_path / "one.pt")]) == 0
    assert export.main([str(tmp_path / "one.pt"), "--format", "sharded", "--out", str(tmp_path / "ckpt_000008")]) == 0
    original, back = ckpt_io.load_checkpoint(folder), ckpt_io.load_checkpoint(tmp_path / "ckpt_000008")
    assert_states_equal(original, back)
    one = load(tmp_path / "one.pt")
    assert_states_equal(one, {**original, "optimizer": sharded.optimizer_by_index(original["optimizer"])})
    assert isinstance(next(iter(one["optimizer"]["state"])), int)  # numbered as Optimizer.state_dict() numbers it
    # never over what exists
    assert export.main([str(folder), "--format", "file", "--out", str(tmp_path / "one.pt")]) == 2


@pytest.mark.slow
def test_a_missing_or_torn_rank_file_is_named_and_the_resume_takes_the_previous_checkpoint(straight, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(straight["fsdp"], run)
    newest = run / f"ckpt_{STEPS:06d}"
    (newest / "__1_0.distcp").unlink()
    with pytest.raises(sharded.ShardedError, match=r"ckpt_000008/__1_0\.distcp: missing \(written by rank 1 of 2\)"):
        sharded.check(newest)
    from tools.reporting.inventory import inventory

    rows = inventory(run).set_index("file")  # the report reads only: it names the damage and renames nothing
    assert rows.loc["ckpt_000008/", "status"].startswith("invalid: __1_0.distcp: missing (written by rank 1 of 2)")
    assert rows.loc["ckpt_000004/", "status"] == "ok" and rows.loc["ckpt_000004/", "resume_pick"]
    assert newest.is_dir()
    state, path = ckpt_io.load_latest(run, ckpt_io.load_resume_state)
    assert path == run / "ckpt_000004" and state["step"] == 4
    assert (run / "ckpt_000008.corrupt").is_dir()  # kept aside, not deleted: nothing saved is lost

    with open(run / "ckpt_000004" / "__0_0.distcp", "r+b") as f:
        f.truncate(100)
    with pytest.raises(sharded.ShardedError, match=r"__0_0\.distcp: truncated \(written by rank 0 of 2\): 100 bytes"):
        sharded.check(run / "ckpt_000004")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["wan_lora", "animatediff_motion"])
def test_a_pretrained_fine_tune_under_fsdp_keeps_what_trains_resumes_exactly_and_exports(tmp_path, family):
    """The pretrained families shard too (one process: one shard, the code path of many): the checkpoint folder
    holds only what trains, a stopped run resumes bit-exactly, DDP trains the same, and export reads the folder."""
    from pretrained import save_sd_pipeline, save_wan_pipeline
    from t2v import export
    from t2v.train import train

    if family == "wan_lora":
        base = save_wan_pipeline(tmp_path / "base", in_channels=3, text_dim=32)
        over = ["model.arch=wan", f"model.pretrained={base}", "diffusion.objective=flow", "diffusion.shift=3",
                "text.tokens=true", "text.dim=32", "data.frames=5", "train.finetune=lora", "train.lora_rank=4",
                "train.lora_alpha=8", "train.lr=1e-2"]
        trains = "lora_"
    else:
        base = save_sd_pipeline(tmp_path / "base", in_channels=3, text_dim=64)
        over = ["model.arch=animatediff", f"model.pretrained={base}", "diffusion.objective=ddpm",
                "diffusion.schedule=linear", "diffusion.beta_start=0.00085", "diffusion.beta_end=0.012",
                "text.tokens=true", "text.dim=64", "data.size=16", "train.finetune=motion"]
        trains = "motion_modules"
    over += ["train.steps=6", "train.ckpt_every=3", "train.val_every=0", "train.sample_every=0"]
    runs = {name: tiny_config(tmp_path / "data", tmp_path / name, *over, *extra)
            for name, extra in (("whole", ["train.parallel=fsdp"]), ("cut", ["train.parallel=fsdp"]), ("ddp", []))}
    prepare(runs["whole"], n_train=8)
    assert train(runs["whole"]) == 0 and train(runs["ddp"]) == 0
    assert train(runs["cut"], stop_at=2) != 0 and train(runs["cut"]) == 0
    whole, cut = (ckpt_io.load_checkpoint(tmp_path / name / "ckpt_000006") for name in ("whole", "cut"))
    assert_states_equal(whole, cut)
    assert all(trains in n for n in whole["model"] if n not in ("null_tokens", "null_text"))
    assert set(whole["optimizer"]["state"]) <= set(whole["model"])  # Adam state for what trains only
    assert_close(load(tmp_path / "ddp" / "ckpt_000006.pt"), whole)
    written = export.export(tmp_path / "whole")  # the newest checkpoint of the run: the folder
    record = json.loads((tmp_path / "whole" / "export" / "ckpt_000006" / "t2v_export.json").read_text())
    assert written.exists() and record["checkpoint"] == str(tmp_path / "whole" / "ckpt_000006")


# --- the facts a run reports --------------------------------------------------------------------------------

class Chain(nn.Module):
    """Linear layers in a row, called as a denoiser is."""

    def __init__(self, *sizes: int):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes, sizes[1:]))

    def forward(self, x, t, text, **_):
        for layer in self.layers:
            x = layer(x)
        return x


def test_model_flops_of_linear_layers_are_counted_forward_and_backward_to_what_trains():
    b = 3
    example = {"x": torch.randn(b, 16), "text": None}
    # forward 2*b*in*out, the weight's gradient as much again; the input needs none
    assert flops.train_flops_per_clip(Chain(16, 8), example, torch.zeros(b)) == 4 * b * 16 * 8
    # a frozen first layer: its forward only (no weight gradient, and nothing before it needs the input's)
    model = Chain(16, 8, 4)
    model.layers[0].requires_grad_(False)
    assert flops.train_flops_per_clip(model, example, torch.zeros(b)) == 2 * b * 16 * 8 + 4 * b * 8 * 4
    # a frozen last layer still passes the gradient back: its input gradient is counted, its weight's not
    model = Chain(16, 8, 4)
    model.layers[1].requires_grad_(False)
    assert flops.train_flops_per_clip(model, example, torch.zeros(b)) == 4 * b * 16 * 8 + 4 * b * 8 * 4


def test_peak_table_knows_the_cluster_cards_and_mig_slices():
    assert flops.peak_tflops("NVIDIA A100-SXM4-40GB", "bf16") == 312.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156.0
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-40GB MIG 3g.20gb", "bf16") == pytest.approx(312.0 * 3 / 7)
    assert flops.peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None  # no MFU rather than a wrong one
    # 10 steps of 1 TFLOP in 10 s on 2 ranks against 0.5 TFLOP/s each: all of it
    assert flops.mfu(10**12, 10, 10.0, 2, 0.5) == pytest.approx(1.0)
    assert flops.mfu(10**12, 10, 10.0, 2, None) is None


def test_deterministic_names_the_op_that_has_no_deterministic_kernel(tmp_path, monkeypatch, capsys):
    from t2v import train as train_mod
    from t2v.device import no_deterministic_kernel, set_deterministic

    set_deterministic(True)
    try:
        with pytest.raises(RuntimeError) as e:
            torch.zeros(5).put_(torch.tensor([0, 3]), torch.ones(2), accumulate=False)
        assert no_deterministic_kernel(e.value) == "put_"
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        set_deterministic(False)
    assert no_deterministic_kernel(RuntimeError("CUDA out of memory")) is None

    def meets_it(cfg):  # a run whose model meets that op: torch's own error, raised where training would
        raise e.value
    monkeypatch.setattr(train_mod, "train", meets_it)
    for var in ("MANIFEST", "OUTDIR", "STEPS", "BS", "FRAMES", "SIZE", "LR"):
        monkeypatch.delenv(var, raising=False)
    assert train_mod.main(["--config", str(REPO / "configs/tiny.yaml"), f"train.outdir={tmp_path}",
                           "train.deterministic=true"]) == 2
    said = "train.deterministic=true, but put_ has no deterministic kernel on this device; train without"
    assert f"error: {said}" in capsys.readouterr().err and said in (tmp_path / "train.log").read_text()


def test_fsdp_settings_that_cannot_work_are_refused_by_name(tmp_path):
    from t2v import config

    with pytest.raises(config.ConfigError, match=r"train\.precision=fp16 .*train\.parallel=fsdp"):
        config.load_config(None, ["train.parallel=fsdp", "train.precision=fp16"], env={})
    with pytest.raises(config.ConfigError, match=r"train\.parallel"):
        config.load_config(None, ["train.parallel=zero3"], env={})


# --- clean exits ----------------------------------------------------------------------------------------------

EXITING_RANK = """
import sys
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from t2v import distributed

d = distributed.init("cpu", 60.0)
net = DDP(torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)]))
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
for _ in range(3):
    net(torch.randn(8, 16)).sum().backward()
    opt.step()
    opt.zero_grad()
print("done", d.rank, flush=True)
distributed.shutdown(d)
distributed.exit_process(int(sys.argv[1]))
"""


@pytest.mark.slow
def test_two_rank_processes_exit_with_their_own_code_every_time(tmp_path):
    """A DDP model left to the garbage collector keeps gloo's process group until the interpreter finalises, where
    its worker thread can abort the process (about 1 two-rank run in 8 here, rc -6). t2v.distributed.exit_process
    leaves before that: 24 runs, every rank's code as asked (0 for a finished run, 75 for a requeue)."""
    script = tmp_path / "rank.py"
    script.write_text(EXITING_RANK)
    codes = []
    for run in range(24):
        want = 75 if run % 2 else 0
        port = free_port()
        procs = [subprocess.Popen([sys.executable, str(script), str(want)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
                                       "PYTHONPATH": str(REPO)})
                 for r in range(2)]
        for rc, out in finish(procs, timeout=120):
            assert rc == want and out.startswith("done"), (run, rc, out)
            codes.append(rc)
    assert len(codes) == 48
