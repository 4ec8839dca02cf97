"""Switching one key on top of a shipped config (--config F key=value), as users do: every switch either loads or
is refused with the one key to change named (the file's line that sets it, and `KEY=null` to undo it), and
following those hints always ends in a config that loads with the switch kept. `key=null` puts any key back to
its default."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from runs import REPO, prepare, tiny_config
from t2v import config as C
from t2v.config_checks import shown

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
# the switches users make, each to every value it can take: model.arch (wan needs its base), the objective, the
# sampling, the space
SWITCHES = [["model.arch=unet"], ["model.arch=dit"], ["model.arch=wan", "model.pretrained=/models/wan"],
            ["diffusion.objective=ddpm"], ["diffusion.objective=flow"], ["data.sampling=even"],
            ["data.sampling=window"], ["model.space=pixel"], ["model.space=latent"]]
UNDO = re.compile(r"add ([\w.]+)=null")
SET = re.compile(r"\bset ([\w.]+=[^\s,;)]+)")


def follow(config: Path, switch: list[str]) -> tuple[C.Config, list[str]]:
    """Load config + switch; while refused, apply what the refusal says (undo a key of the file, or set the key it
    names): returns the config and every argument added. Fails if a refusal names no key to change."""
    args, added, mine = list(switch), [], {a.split("=")[0] for a in switch}
    for _ in range(8):
        try:
            return C.load_config(config, args, env={}), added
        except C.ConfigError as e:
            fixes = []
            for problem in re.split(r"\n  (?! )", str(e))[1:]:  # one problem a line, its hints indented below
                named = [f"{k}=null" for k in UNDO.findall(problem)] + SET.findall(problem)
                named = [f for f in named if f.split("=")[0] not in mine]
                assert named, f"--config {config.name} {' '.join(switch)}: a refusal that names no key to change:\n{e}"
                fixes.append(named[0])
            fixes = list(dict.fromkeys(fixes))
            args += fixes
            added += fixes
    raise AssertionError(f"--config {config.name} {' '.join(switch)}: still refused after {added}")


@pytest.mark.parametrize("switch", SWITCHES, ids=lambda s: s[0])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_switch_loads_or_names_the_key_to_change(config, switch):
    cfg, added = follow(config, switch)
    for arg in switch:  # the user's switch is kept: only keys of the file are undone
        key, value = arg.split("=", 1)
        section, name = key.split(".")
        assert shown(getattr(getattr(cfg, section), name)) == value


def test_a_refusal_that_follows_from_the_file_names_its_line_and_the_undo():
    with pytest.raises(C.ConfigError) as e:
        C.load_config(REPO / "configs/latent.yaml", ["model.arch=dit"], env={})
    line = next(i for i, text in enumerate((REPO / "configs/latent.yaml").read_text().splitlines(), 1)
                if text.strip().startswith("temporal_attention:"))
    assert (f"configs/latent.yaml:{line} sets model.temporal_attention=true: add model.temporal_attention=null to "
            "put back its default (false)") in str(e.value)
    with pytest.raises(C.ConfigError, match=r"latent_dit_flow.yaml:\d+ sets data.fps=8: add data.fps=null"):
        C.load_config(REPO / "configs/latent_dit_flow.yaml", ["data.sampling=even"], env={})
    cfg = C.load_config(REPO / "configs/latent_dit_flow.yaml", ["data.sampling=even", "data.fps=null"], env={})
    assert cfg.data.fps == 0 and cfg.data.sampling == "even"
    # a key the command line set is the user's own: no hint to undo it; the environment's is named
    with pytest.raises(C.ConfigError) as e:
        C.load_config(REPO / "configs/tiny.yaml", ["model.arch=dit", "model.coords=true"], env={})
    assert "model.coords applies to model.arch=unet only" in str(e.value) and "null" not in str(e.value)


def test_null_and_empty_put_a_key_back_to_its_default(tmp_path):
    cfg = C.load_config(REPO / "configs/demo.yaml", ["data.size=null", "train.guidance=null", "model.coords=null",
                                                       "data.strides=null", "train.sample_method=", "text.encoder="],
                        env={})
    d = C.Config()
    assert (cfg.data.size, cfg.train.guidance, cfg.model.coords, cfg.data.strides, cfg.text.encoder) == (
        d.data.size, d.train.guidance, d.model.coords, d.data.strides, d.text.encoder)
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  size:\n  frames: 4\n")  # a key with no value in a file: its default too
    cfg = C.load_config(f, [], env={})
    assert cfg.data.size == d.data.size and cfg.data.frames == 4


@pytest.mark.slow
def test_switched_demo_configs_train_a_step(tmp_path):
    """The switches that keep pixel space, on the demo's config, after their hints: each trains a step."""
    from t2v.train import train

    demo = REPO / "configs/demo.yaml"
    for i, switch in enumerate([["model.arch=dit"], ["diffusion.objective=ddpm"], ["data.sampling=window"]]):
        _, added = follow(demo, switch)
        extra = [*switch, *added, "train.steps=1", "train.batch_size=2", "train.val_every=0", "train.sample_every=0",
                 "train.ckpt_every=1", "train.tensorboard=false", "data.fps=8" if "window" in switch[0] else ""]
        cfg = tiny_config(tmp_path / "data", tmp_path / f"run{i}", *[a for a in extra if a], config="configs/demo.yaml")
        prepare(cfg, n_train=8)
        assert train(cfg) == 0, switch
        assert (tmp_path / f"run{i}" / "ckpt_000001.pt").is_file()
