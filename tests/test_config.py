"""Configuration: defaults < YAML < the baseline's env vars < key=value; unknown keys fail and list valid ones."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from t2v import config as C

REPO = Path(__file__).resolve().parents[1]


def test_defaults_are_the_baselines():
    cfg = C.load_config(env={})
    assert (cfg.data.manifest, cfg.train.outdir) == ("/scratch/data/manifests/train.manifest.processed.jsonl",
                                                     "/scratch/runs/t2v_ddpm")
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.frames, cfg.data.size, cfg.train.lr) == (1000, 2, 8, 64, 1e-4)
    assert (cfg.diffusion.timesteps, cfg.diffusion.schedule, cfg.train.ckpt_every, cfg.train.sample_every) == (
        1000, "cosine", 200, 200)
    assert (cfg.text.name, cfg.text.dim) == ("openai/clip-vit-base-patch32", 512)


def test_precedence_yaml_then_env_then_arguments(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 10\n  batch_size: 3\n  lr: 3.0e-4\ndata:\n  frames: 4\n")
    env = {"STEPS": "20", "BS": "5", "MANIFEST": "/m.jsonl", "OUTDIR": "/o", "SIZE": "32"}
    cfg = C.load_config(f, ["train.steps=30", "model.channel_mults=[1,2]"], env=env)
    assert cfg.train.steps == 30  # argument beats env beats YAML
    assert cfg.train.batch_size == 5  # env beats YAML
    assert cfg.train.lr == 3e-4 and cfg.data.frames == 4  # YAML beats defaults
    assert (cfg.data.manifest, cfg.train.outdir, cfg.data.size) == ("/m.jsonl", "/o", 32)
    assert cfg.model.channel_mults == (1, 2)
    # CONFIG in the environment names the YAML file; an empty variable changes nothing
    assert C.load_config(env={"CONFIG": str(f), "LR": ""}).train.lr == 3e-4


def test_unknown_key_fails_and_lists_the_valid_ones(tmp_path):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(overrides=["train.stepz=5"], env={})
    assert "train.stepz" in str(e.value) and "train.steps" in str(e.value) and "data.manifest" in str(e.value)
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  steps: 10\n\n  bogus: 1\n")
    with pytest.raises(C.ConfigError, match=rf"{f}:4: unknown config key 'train.bogus'"):
        C.load_config(f, env={})


def test_bad_values_name_where_they_came_from(tmp_path):
    with pytest.raises(C.ConfigError, match="environment variable BS: bad value for train.batch_size"):
        C.load_config(env={"BS": "two"})
    with pytest.raises(C.ConfigError, match="expected key=value"):
        C.load_config(overrides=["train.steps"], env={})
    with pytest.raises(C.ConfigError, match="data.size must be a multiple of 8"):
        C.load_config(overrides=["data.size=30"], env={})
    with pytest.raises(C.ConfigError, match=r"multiple of 16 .*patches of 2 pixels \(model.patch\)"):
        C.load_config(overrides=["data.size=24", "model.patch=2"], env={})
    with pytest.raises(C.ConfigError,
                       match=r"data.frames must be a multiple of 4 with model.downsample_time .*, got 6"):
        C.load_config(overrides=["data.frames=6", "model.downsample_time=true"], env={})
    with pytest.raises(C.ConfigError, match="model.frame_cond and model.downsample_time do not go together"):
        C.load_config(overrides=["model.frame_cond=true", "model.downsample_time=true"], env={})
    f = tmp_path / "bad.yaml"
    f.write_text("train: [1, 2\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(f, env={})
    with pytest.raises(C.ConfigError, match="config file not found"):
        C.load_config(tmp_path / "missing.yaml", env={})


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(overrides=["train.steps=7", "model.size=tiny"], env={})
    C.save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["steps"] == 7
    assert C.from_dict(saved) == cfg == C.from_dict(C.to_dict(cfg))


@pytest.mark.parametrize("arg,message", [
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.grad_clip=0", "train.grad_clip must be > 0"),
    ("train.dist_timeout_s=0", "train.dist_timeout_s must be > 0"),
    ("train.ema_decay=1", "train.ema_decay must be in [0, 1)"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("train.warmup=-5", "train.warmup must be >= 0"),
    ("train.lr_cooldown=1.5", "train.lr_cooldown must be in [0, 1]"),
    ("train.sample_steps=0", "train.sample_steps must be in [1,"),
    ("train.val_timesteps=[100,1000]", "train.val_timesteps must be integers in [0, diffusion.timesteps=1000)"),
    ("train.val_timesteps=[a]", "train.val_timesteps must be integers"),
    ("diffusion.shift=0", "diffusion.shift must be > 0"),
    ("diffusion.snr_gamma=-1", "diffusion.snr_gamma must be >= 0"),
])
def test_bad_values_fail_at_load_with_the_key(arg, message):
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.load_config(None, [arg], env={})


def test_zero_turns_previews_and_validation_off_and_lists_parse():
    cfg = C.load_config(None, ["train.sample_every=0", "train.val_every=0", "train.val_timesteps=100,500"], env={})
    assert (cfg.train.sample_every, cfg.train.val_every, cfg.train.val_timesteps) == (0, 0, (100, 500))


def test_training_cli_exits_2_with_the_message(capsys):
    from t2v.train import main

    assert main(["train.log_every=0"]) == 2
    assert "train.log_every must be >= 1" in capsys.readouterr().err


def test_every_shipped_config_loads():
    """A typo in a shipped config costs a user a queue wait: each one resolves and validates as it is."""
    shipped = sorted((REPO / "configs").glob("*.yaml"))
    assert len(shipped) >= 10
    for path in shipped:
        cfg = C.load_config(path, env={})
        assert cfg.train.outdir, path
    wan = C.load_config(REPO / "configs/wan_lora.yaml", env={})
    assert (wan.model.arch, wan.train.finetune, wan.text.encoder, wan.data.frames % 4) == ("wan", "lora", "umt5", 1)
