"""The demo learns its captions: what `make demo` trains follows the colour its prompt names."""
from __future__ import annotations

import pytest

from runs import REPO, prepare, tiny_config
from t2v.train import train

pytestmark = pytest.mark.slow


def test_demo_model_draws_the_colour_its_caption_names(tmp_path):
    from tools.demo_check import color_accuracy

    cfg = tiny_config(tmp_path / "data", tmp_path / "run", config="configs/demo.yaml")
    prepare(cfg, n_train=96)
    assert train(cfg) == 0
    result = color_accuracy(tmp_path / "run", out=tmp_path / "run" / "eval")
    # 48 prompts (4 colours x 3 shapes x 4 motions); chance is 25%
    assert result["accuracy"] >= 0.8, result
    assert min(result["per_color"].values()) >= 0.5, result
    assert (tmp_path / "run" / "samples").is_dir() and list((tmp_path / "run" / "samples").glob("preview_step*.png"))
