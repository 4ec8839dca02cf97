"""Bigger batches and models than memory allows: gradient accumulation and activation checkpointing."""
from __future__ import annotations

import pytest
import torch

from runs import assert_states_equal, load, prepare, tiny_config
from t2v import config as C
from t2v import train as T
from t2v.models import build_model


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("scale")
    prepare(tiny_config(d, d / "unused"))
    return d


# caption dropout on (drawn per global batch like the noise); model.dropout stays 0: its masks come from the global
# RNG per micro-batch, so with it a split differs from the full batch by its masks (resume stays exact either way)
ARGS = ("train.steps=4", "train.ckpt_every=2", "train.log_every=1", "train.val_every=0", "diffusion.cond_dropout=0.5")


def weights_close(a: dict, b: dict, key: str = "model", atol: float = 1e-5) -> None:
    assert a[key].keys() == b[key].keys()
    for name in a[key]:
        assert torch.allclose(a[key][name], b[key][name], rtol=1e-4, atol=atol), f"{key}.{name}"


def test_micro_batches_match_the_full_batch(data_dir, tmp_path):
    """BS=1 x grad_accum=2 takes the steps BS=2 takes: same clips, noise, timesteps and caption dropout, and the
    accumulated gradient is the full batch's mean (to float tolerance: two sums instead of one)."""
    assert T.train(tiny_config(data_dir, tmp_path / "full", *ARGS, "train.batch_size=2")) == 0
    assert T.train(tiny_config(data_dir, tmp_path / "accum", *ARGS, "train.batch_size=1", "train.grad_accum=2")) == 0
    full, accum = load(tmp_path / "full" / "ckpt_000004.pt"), load(tmp_path / "accum" / "ckpt_000004.pt")
    assert full["data"]["global_batch"] == accum["data"]["global_batch"] == 2 and accum["data"]["grad_accum"] == 2
    weights_close(full, accum)
    weights_close(full, accum, "ema")
    log = (tmp_path / "accum" / "train.log").read_text()
    assert "global batch 2 = 1 x 2 (2 micro-batches of 1)" in log
    losses = [line for line in log.splitlines() if line.startswith("step ")]
    full_losses = [line for line in (tmp_path / "full" / "train.log").read_text().splitlines() if line.startswith("step ")]
    assert [float(x.split("loss ")[1]) for x in losses] == pytest.approx(
        [float(x.split("loss ")[1]) for x in full_losses], abs=2e-4)


def test_accumulation_resumes_bit_exact(data_dir, tmp_path):
    args = (*ARGS, "train.batch_size=2", "train.grad_accum=2", "train.steps=6", "model.dropout=0.1")
    assert T.train(tiny_config(data_dir, tmp_path / "straight", *args)) == 0
    assert T.train(tiny_config(data_dir, tmp_path / "resumed", *args), stop_at=3) == T.REQUEUE_EXIT
    assert T.train(tiny_config(data_dir, tmp_path / "resumed", *args)) == 0
    assert_states_equal(load(tmp_path / "straight" / "ckpt_000006.pt"), load(tmp_path / "resumed" / "ckpt_000006.pt"))


def test_resume_with_another_split_of_the_same_global_batch(data_dir, tmp_path):
    """A run of BS=2 resumed as BS=1 x grad_accum=2 (say, on a smaller GPU): the global batch and data order are
    kept, nothing is refused, and it ends where the BS=2 run ends, to float tolerance."""
    assert T.train(tiny_config(data_dir, tmp_path / "straight", *ARGS, "train.batch_size=2", "train.steps=6")) == 0
    assert T.train(tiny_config(data_dir, tmp_path / "split", *ARGS, "train.batch_size=2")) == 0
    assert T.train(tiny_config(data_dir, tmp_path / "split", *ARGS, "train.batch_size=1", "train.grad_accum=2",
                               "train.steps=6")) == 0
    assert "kept from the checkpoint" not in (tmp_path / "split" / "train.log").read_text()
    weights_close(load(tmp_path / "straight" / "ckpt_000006.pt"), load(tmp_path / "split" / "ckpt_000006.pt"))
    with pytest.raises(T.TrainingError, match="does not split into train.grad_accum=3"):
        T.train(tiny_config(data_dir, tmp_path / "split", *ARGS, "train.grad_accum=3", "train.steps=8"))


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    cfg = C.load_config(None, ["model.size=tiny", "text.dim=32", "model.dropout=0.2", "model.temporal_attention=true"],
                        env={})
    plain = build_model(cfg)
    cfg.model.checkpointing = True
    ckpt = build_model(cfg)
    ckpt.load_state_dict(plain.state_dict())
    x, t, text = torch.randn(2, 4, 3, 16, 16), torch.tensor([10, 500]), torch.randn(2, 32)
    grads = []
    for m in (plain, ckpt):
        torch.manual_seed(0)  # the same dropout masks: checkpointing replays the RNG when it recomputes
        loss = (m.train()(x, t, text) - x).pow(2).mean()
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in m.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    for g0, g1 in zip(grads[0][1], grads[1][1]):
        assert torch.allclose(g0, g1, atol=1e-6)


def test_checkpointing_may_change_on_resume():
    a = C.load_config(None, ["model.size=tiny"], env={})
    b = C.load_config(None, ["model.size=tiny", "model.checkpointing=true"], env={})
    assert T.incompatible_changes(a, b) == []  # how the step computes, not what the weights are
