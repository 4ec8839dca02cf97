"""DDP on CPU with gloo: 2 ranks with batch b train like one process with batch 2b; a signal to one rank
stops (saves, asks for requeue) the whole job; resume works on another world size."""
from __future__ import annotations

import signal

import pytest

from runs import assert_close, finish, launch, load, prepare, tiny_config
from t2v.train import REQUEUE_EXIT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    prepare(tiny_config(d, d / "unused"))
    return d


@pytest.mark.parametrize("recipe", [(), ("model.arch=dit", "diffusion.objective=flow")], ids=["unet_ddpm", "dit_flow"])
def test_two_ranks_match_one_process_with_double_batch(data_dir, tmp_path, recipe):
    common = ("train.steps=12", "train.ckpt_every=12", "train.log_every=4", "diffusion.cond_dropout=0.3", *recipe)
    (rc, out), = finish(launch(data_dir, tmp_path / "one", 1, "train.batch_size=4", *common))
    assert rc == 0, out
    results = finish(launch(data_dir, tmp_path / "two", 2, "train.batch_size=2", *common))
    assert [rc for rc, _ in results] == [0, 0], results
    assert "global batch 4 = 2 x 2" in results[0][1]
    assert results[1][1].count("step 0000") == 0  # only rank 0 logs
    assert_close(load(tmp_path / "one" / "ckpt_000012.pt"), load(tmp_path / "two" / "ckpt_000012.pt"))
    # the logged loss is the mean over ranks: the same curve as one process
    one = [l for l in (tmp_path / "one" / "train.log").read_text().splitlines() if l.startswith("step")]
    two = [l for l in (tmp_path / "two" / "train.log").read_text().splitlines() if l.startswith("step")]
    assert [float(l.split()[-1]) for l in one] == pytest.approx([float(l.split()[-1]) for l in two], abs=2e-4)


def test_signal_to_one_rank_stops_all_and_resumes_on_one_process(data_dir, tmp_path):
    common = ("train.steps=400", "train.ckpt_every=1000", "train.log_every=1")
    procs = launch(data_dir, tmp_path / "run", 2, "train.batch_size=2", *common)
    for line in procs[0].stdout:  # wait until training is under way
        if line.startswith("step 000003"):
            break
    procs[1].send_signal(signal.SIGUSR1)  # only rank 1 hears it, as when Slurm signals one task
    results = finish(procs)
    assert [rc for rc, _ in results] == [REQUEUE_EXIT, REQUEUE_EXIT], results
    from t2v.checkpoint import list_checkpoints

    (stop, _), = list_checkpoints(tmp_path / "run")
    assert 3 <= stop < 400
    # resume on one process: the global batch (4) is kept, the sample order and the noise are the same
    (rc, out), = finish(launch(data_dir, tmp_path / "run", 1, "train.batch_size=2", *common[1:],
                               f"train.steps={stop + 4}"))
    assert rc == 0 and f"at step {stop}" in out, out
    (rc, out), = finish(launch(data_dir, tmp_path / "straight", 1, "train.batch_size=4", *common[1:],
                               f"train.steps={stop + 4}"))
    assert rc == 0, out
    assert_close(load(tmp_path / "straight" / f"ckpt_{stop + 4:06d}.pt"),
                 load(tmp_path / "run" / f"ckpt_{stop + 4:06d}.pt"))
