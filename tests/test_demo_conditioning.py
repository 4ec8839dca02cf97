"""The demo learns its captions: what `make demo` trains draws the colour, shape and motion its prompt names."""
from __future__ import annotations

import json

import pytest

from runs import prepare, tiny_config
from t2v.train import train

pytestmark = pytest.mark.slow

# What `make demo` scores (docs/demo.md): every colour, shape and direction 100%, background 0.036; the issue's
# targets are every colour and direction >= 95%, every shape >= 90%, background <= 0.05. Thread counts and BLAS
# builds change the floating-point sums, and with them a few of the 48 samples: the test keeps the targets with
# about three prompts of slack on each mean, three of the 16 (shape) or two of the 12 (direction) prompts of a
# class, and 0.02 of background.
MIN = {"color": 0.90, "shape": 0.90, "motion": 0.90}
MIN_PER_CLASS = 0.80  # every shape and every direction: none is drawn as another
MAX_BACKGROUND = 0.07  # mean brightness away from the shape; black is 0, the untrained model's speckle ~0.3


def test_demo_model_draws_what_its_caption_says(tmp_path):
    from tools.demo_check import check

    cfg = tiny_config(tmp_path / "data", tmp_path / "run", config="configs/demo.yaml")
    prepare(cfg, n_train=96)
    assert train(cfg) == 0
    result = check(tmp_path / "run", out=tmp_path / "run" / "eval")
    assert all(result[k] >= v for k, v in MIN.items()), {k: result[k] for k in (*MIN, "background")}
    assert result["background"] <= MAX_BACKGROUND, result["background"]
    assert min(result["per_motion"].values()) >= MIN_PER_CLASS, result["per_motion"]
    assert min(result["per_shape"].values()) >= MIN_PER_CLASS, result["per_shape"]
    assert json.loads((tmp_path / "run" / "eval" / "demo_check.json").read_text())["motion"] == result["motion"]
    # the run also logged its validation loss, and it fell
    val = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
           if r.get("event") == "val"]
    assert len(val) >= 2 and val[-1]["val_loss"] < val[0]["val_loss"], val
