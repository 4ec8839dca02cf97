"""torch.distributed set-up without processes (fast): which node each rank reports, what a lost or hung rank's
error says, and the refusal of a rendezvous through the run folder outside a Slurm job."""
from __future__ import annotations

import pytest

from t2v import distributed
from t2v.distributed import DistError, Dist


def test_rank_nodes_are_described_grouped_by_node():
    assert distributed.describe_nodes(["tn1", "tn2"]) == "rank 0 on tn1, rank 1 on tn2"
    assert distributed.describe_nodes(["a"] * 4 + ["b"] * 4) == "ranks 0-3 on a, ranks 4-7 on b"
    assert distributed.rank_nodes(Dist()) == [distributed.node_name()]


def test_node_name_is_slurms_when_there_is_one(monkeypatch):
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-b11-2")
    assert distributed.node_name() == "gpu-b11-2"


@pytest.mark.parametrize("torch_says,we_say", [
    ("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms for recv operation to complete",
     "no answer from the other ranks within train.dist_timeout_s=8 s: a rank hung, or its node stopped responding"),
    ("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:23750: Connection reset by peer",
     "another rank closed its connection: it crashed, was killed, or lost its node"),
    ("Watchdog caught collective operation timeout: WorkNCCL(SeqNum=12, OpType=ALLREDUCE, Timeout(ms)=8000)",
     "no answer from the other ranks within train.dist_timeout_s=8 s"),
])
def test_a_lost_or_hung_rank_is_said_plainly(monkeypatch, torch_says, we_say):
    monkeypatch.setenv("SLURMD_NODENAME", "tn1")
    e = distributed.lost_ranks(RuntimeError(torch_says), Dist(0, 2), 8)
    assert isinstance(e, DistError)
    assert str(e).startswith(f"rank 0 on tn1: {we_say}") and torch_says[:60] in str(e)


def test_other_errors_are_not_taken_for_lost_ranks():
    assert distributed.lost_ranks(RuntimeError("CUDA out of memory"), Dist(0, 2), 8) is None
    assert distributed.lost_ranks(RuntimeError("Timed out"), Dist(), 8) is None  # one process has no peers
    assert distributed.lost_ranks(ValueError("timed out"), Dist(0, 2), 8) is None


def test_master_port_0_needs_a_slurm_job(monkeypatch, tmp_path):
    for k, v in {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(DistError, match="MASTER_PORT=0 .* needs a Slurm job"):
        distributed.init("cpu", 5, tmp_path)


def test_the_other_ranks_wait_at_most_the_timeout_for_rank_0s_port(monkeypatch, tmp_path):
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "0",
                 "SLURM_JOB_ID": "41", "SLURM_RESTART_COUNT": "2"}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistError, match=r"rank 1 on .*: rank 0 did not publish its port in .*\.rendezvous-41-2 "
                                        r"within train\.dist_timeout_s=0\.3 s"):
        distributed.init("cpu", 0.3, tmp_path)


def test_a_resume_on_a_world_size_that_does_not_divide_the_global_batch_is_refused(tmp_path):
    from types import SimpleNamespace

    from t2v import config
    from t2v.checkpointer import Checkpointer
    from t2v.runlog import RunLog, TrainingError

    cfg = config.load_config(None, [f"train.outdir={tmp_path}"], env={})
    state = {"config": config.to_dict(cfg), "data": {"global_batch": 4, "world_size": 2, "vae": None}}
    space = SimpleNamespace(channels=3, identity=None)
    cp = Checkpointer(tmp_path, cfg, RunLog(tmp_path, enabled=False), Dist(0, 3))
    with pytest.raises(TrainingError, match=r"ckpt_000010\.pt: saved on 2 ranks with global batch 4, which 3 ranks cannot split evenly; "
                                            r"resume on a world size that divides 4"):
        cp.check_resume(state, tmp_path / "ckpt_000010.pt", cfg.train.batch_size * 3, space)
    # 4 ranks divide it: the checkpoint's global batch is kept, 1 per rank
    assert Checkpointer(tmp_path, cfg, RunLog(tmp_path, enabled=False), Dist(0, 4)).check_resume(
        state, tmp_path / "ckpt_000010.pt", 8, space) == 4
