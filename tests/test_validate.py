"""Validation loss at fixed timesteps: logged, the same on every measurement of the same weights, resume-safe."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from runs import assert_states_equal, load, prepare, tiny_config
from t2v.objective import build_objective
from t2v.models import build_model
from t2v.sample import load_ema
from t2v.text import EmbeddingCache, encoder_key
from t2v import config as C
from t2v.train import REQUEUE_EXIT, train
from t2v.validate import load_val_set, val_loss

ARGS = ("train.steps=24", "train.val_every=8", "train.ckpt_every=5", "train.log_every=4", "train.val_clips=3",
        "train.val_timesteps=[50,500,950]")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    prepare(tiny_config(d, d / "unused"))
    return d


def val_records(outdir):
    return [r for r in map(json.loads, (outdir / "metrics.jsonl").read_text().splitlines()) if r.get("event") == "val"]


def test_val_loss_is_logged_and_resume_safe(data_dir, tmp_path):
    straight = tiny_config(data_dir, tmp_path / "straight", *ARGS)
    assert train(straight) == 0
    recs = val_records(tmp_path / "straight")
    assert [r["step"] for r in recs] == [8, 16, 24]
    assert all({"val_loss", "val_loss_t50", "val_loss_t500", "val_loss_t950"} <= r.keys() for r in recs)
    assert all(r["val_loss"] == pytest.approx((r["val_loss_t50"] + r["val_loss_t500"] + r["val_loss_t950"]) / 3)
               for r in recs)
    lines = [l for l in (tmp_path / "straight" / "train.log").read_text().splitlines() if l.startswith("val step")]
    assert lines[0].startswith("val step 000008 | t50 ") and " | mean " in lines[0]

    # stopped between two validations and resumed: the same figures, and bit-exact weights
    resumed = tiny_config(data_dir, tmp_path / "resumed", *ARGS)
    assert train(resumed, stop_at=11) == REQUEUE_EXIT
    assert train(resumed) == 0
    again = val_records(tmp_path / "resumed")
    assert [(r["step"], r["val_loss_t50"], r["val_loss_t950"]) for r in again] == \
           [(r["step"], r["val_loss_t50"], r["val_loss_t950"]) for r in recs]
    assert_states_equal(load(tmp_path / "straight" / "ckpt_000024.pt"), load(tmp_path / "resumed" / "ckpt_000024.pt"))

    # validation does not move the training RNG: a run without it ends in the same state
    off = tiny_config(data_dir, tmp_path / "off", *ARGS, "train.val_every=0")
    assert train(off) == 0
    assert not val_records(tmp_path / "off")
    assert_states_equal(load(tmp_path / "straight" / "ckpt_000024.pt"), load(tmp_path / "off" / "ckpt_000024.pt"))


def test_same_weights_same_figures_and_learning_shows(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path / "run", *ARGS)
    train(cfg)
    emb = EmbeddingCache.load(C.cache_dir(cfg, "text"), encoder_key(cfg.text))
    valset, why = load_val_set(cfg, emb)
    assert why == "" and valset.videos.shape[0] == 3 and valset.timesteps == (50, 500, 950)
    objective = build_objective(cfg.diffusion)
    _, ema, _ = load_ema(tmp_path / "run" / "ckpt_000024.pt")
    first, second = val_loss(ema, objective, valset, "cpu"), val_loss(ema, objective, valset, "cpu")
    assert first == second  # fixed clips, timesteps and noise
    # a fresh set built again draws the same noise, and the logged figure is this one
    again, _ = load_val_set(cfg, emb)
    assert torch.equal(again.noise, valset.noise)
    assert val_records(tmp_path / "run")[-1]["val_loss_t500"] == pytest.approx(first[500], rel=1e-6)
    # the untrained model (it predicts 0, so its eps loss is E[eps²] = 1) is worse than the trained one
    untrained = build_model(cfg).eval()
    assert val_loss(untrained, objective, valset, "cpu")[500] == pytest.approx(1.0, abs=0.1)
    assert first[500] < 0.9
    # flow: t = 500 / 1000, and a model that predicts 0 misses the whole velocity eps - x0: E[eps²] + E[x0²]
    flow_cfg = C.load_config(None, ["diffusion.objective=flow"], env={})
    flow_loss = val_loss(untrained, build_objective(flow_cfg.diffusion), valset, "cpu")
    assert flow_loss[500] == pytest.approx(1.0 + valset.videos.pow(2).mean().item(), rel=0.05)


def test_no_validation_manifest_is_one_log_line(data_dir, tmp_path):
    other = tmp_path / "data"
    shutil.copytree(data_dir, other)
    (other / "val.jsonl").unlink()
    cfg = tiny_config(other, tmp_path / "run", "train.steps=4", "train.val_every=2")
    assert train(cfg) == 0
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"no validation manifest {other / 'val.jsonl'}" in log and "val step" not in log
