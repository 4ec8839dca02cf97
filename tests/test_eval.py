"""Evaluation: the Fréchet distance against closed forms, CLIPSIM, I3D plumbing, and `python -m t2v.eval` on a
tiny trained run, with tiny random CLIP / I3D stand-ins (no downloads)."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runs import prepare, tiny_config
from t2v import eval as E
from t2v import metrics as M
from t2v.text import WordHashTokenizer

# The stand-in I3D is built with torch.jit.script/save, which torch >= 2.10 deprecates (the real file is TorchScript).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")

# ------------------------------------------------------------------------------------ stand-in models


class TinyI3D(torch.nn.Module):
    """Same call signature as StyleGAN-V's i3d_torchscript.pt: (B, 3, T, H, W) in [-1, 1] -> (B, D) features.
    Refuses calls the real one would answer differently (rescale=True, logits) or too few frames."""

    def __init__(self, dim: int = 12):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(9, dim, generator=g))

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True,
                return_features: bool = False) -> torch.Tensor:
        if rescale or not return_features:
            raise RuntimeError("expected rescale=False, return_features=True")
        if x.dim() != 5 or x.size(1) != 3 or x.size(2) < 16:
            raise RuntimeError("expected (B, 3, T>=16, H, W)")
        if resize:
            x = F.interpolate(x, size=[x.size(2), 8, 8], mode="trilinear", align_corners=False)
        mean = x.mean(dim=[2, 3, 4])
        std = x.std(dim=[2, 3, 4])
        motion = (x[:, :, 1:] - x[:, :, :-1]).abs().mean(dim=[2, 3, 4])
        return torch.cat([mean, std, motion], dim=1) @ self.proj


TOKENIZER_ARGS = dict(vocab_size=1000, bos_id=1, eos_id=3, pad_id=0, first_word_id=4, n_word_ids=996)


def tiny_clip_model(vocab_size: int = 1000, bos: int = 1, eos: int = 3, pad: int = 0, seed: int = 0):
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=pad)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  image_size=32, patch_size=8)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()


@pytest.fixture(scope="module")
def scorer():
    return E.ClipScorer(tiny_clip_model(), WordHashTokenizer(**TOKENIZER_ARGS), name="tiny-clip")


@pytest.fixture(scope="module")
def i3d_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(TinyI3D().eval()), str(path))
    return path


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory):
    """A tiny CLIPModel + a tiny real CLIPTokenizer saved like a downloaded model folder."""
    from transformers import CLIPTokenizer

    d = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "<unk>": 2}
    for ch in "abcdefghijklmnopqrstuvwxyz":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (d / "vocab.json").write_text(json.dumps(vocab))
    (d / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), unk_token="<unk>", pad_token="<|endoftext|>")
    folder = d / "tiny-clip"
    tiny_clip_model(vocab_size=len(tok), bos=0, eos=1, pad=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-step tiny training run (4 frames x 16x16, hash text encoder) and its demo data."""
    from t2v.train import train

    d = tmp_path_factory.mktemp("evalrun")
    cfg = tiny_config(d, d / "run", "train.steps=2", "train.ckpt_every=2", "train.log_every=1")
    prepare(cfg)
    assert train(cfg) == 0
    return d, d / "run"


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_diagonal_closed_form():
    rng = np.random.default_rng(0)
    for d in (1, 5, 64):
        s1, s2 = rng.uniform(0, 4, d), rng.uniform(0, 4, d)
        s1[: d // 5] = 0.0  # singular covariances are the normal case for FVD
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
        exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
        got = M.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
        assert got == pytest.approx(exact, rel=1e-10, abs=1e-10)
    assert M.frechet_distance([0.0], [[4.0]], [3.0], [[1.0]]) == pytest.approx(9 + 1, abs=1e-12)


def test_frechet_commuting_and_general_cases():
    rng = np.random.default_rng(1)
    d = 40
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    s1, s2 = rng.uniform(0, 3, d), rng.uniform(0, 3, d)
    s1[:7] = 0.0
    a, b = (q * s1) @ q.T, (q * s2) @ q.T  # commuting, not diagonal: same eigenvectors
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    assert M.frechet_distance(mu1, a, mu2, b) == pytest.approx(exact, rel=1e-10)
    assert M.frechet_distance(mu1, a, mu2, a) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-10)
    # A general (non-commuting, full-rank) pair against an independent route: tr sqrt(S1 S2) from eigvals.
    x, y = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    c1, c2 = x @ x.T / d + 0.1 * np.eye(d), y @ y.T / d + 0.1 * np.eye(d)
    ref = np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.sqrt(np.linalg.eigvals(c1 @ c2).real).sum()
    got = M.frechet_distance(mu1, c1, mu2, c2)
    assert got == pytest.approx(ref, rel=1e-8)
    assert M.frechet_distance(mu2, c2, mu1, c1) == pytest.approx(got, rel=1e-10)  # symmetric
    # torch inputs in float32 are accepted and computed in float64
    t = M.frechet_distance(torch.tensor(mu1, dtype=torch.float32), torch.tensor(c1, dtype=torch.float32),
                           torch.tensor(mu2, dtype=torch.float32), torch.tensor(c2, dtype=torch.float32))
    assert t == pytest.approx(got, rel=1e-5)


def test_feature_stats_fvd_self_zero_and_shift():
    rng = np.random.default_rng(2)
    f = rng.normal(size=(20, 64)) * 3 + 1  # fewer samples than dimensions: singular covariance
    mu, sigma = M.feature_stats(f)
    np.testing.assert_allclose(mu, f.mean(0))
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-12, atol=1e-12)
    assert M.fvd_from_features(f, f) == pytest.approx(0.0, abs=1e-9)
    delta = rng.normal(size=64)
    values = [M.fvd_from_features(f, f + k * delta) for k in (0.0, 0.5, 1.0, 2.0)]
    # a pure shift leaves the covariance alone: FD = k^2 |delta|^2 exactly
    np.testing.assert_allclose(values, [k * k * delta @ delta for k in (0.0, 0.5, 1.0, 2.0)], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="at least 2"):
        M.feature_stats(f[:1])
    with pytest.raises(ValueError, match="NaN"):
        M.feature_stats(np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="-d"):
        M.fvd_from_features(f, f[:, :10])


def test_frechet_non_psd_input_falls_back_to_eps():
    bad = np.diag([1.0, -0.5])  # not a covariance
    with pytest.warns(RuntimeWarning, match="adding"):
        v = M.frechet_distance(np.zeros(2), bad, np.zeros(2), np.eye(2))
    assert math.isfinite(v) and v >= 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a valid singular input must not warn
        M.frechet_distance(np.zeros(2), np.diag([1.0, 0.0]), np.zeros(2), np.zeros((2, 2)))


# ------------------------------------------------------------------------------------------------ I3D


def test_stretch_frames_repeats_to_16():
    v = torch.arange(8).view(1, 8, 1, 1, 1).float()
    out = E.stretch_frames(v)
    assert out.shape[1] == 16 and out.flatten().tolist() == [i // 2 for i in range(16)]
    assert E.stretch_frames(torch.zeros(2, 4, 3, 2, 2)).shape == (2, 16, 3, 2, 2)
    long = torch.zeros(1, 20, 3, 2, 2)
    assert E.stretch_frames(long) is long


def test_i3d_torchscript_features_and_fvd_monotone(i3d_file):
    det = E.load_i3d(i3d_file)
    g = torch.Generator().manual_seed(0)
    videos = torch.rand(10, 8, 3, 16, 16, generator=g) - 0.5  # (B, T, 3, H, W) in [-1, 1]
    feats = E.i3d_features(det, videos)
    assert feats.shape == (10, 12) and feats.dtype == np.float64
    assert M.fvd_from_features(feats, feats) == pytest.approx(0.0, abs=1e-9)
    fvds = [M.fvd_from_features(feats, E.i3d_features(det, (videos + s).clamp(-1, 1))) for s in (0.1, 0.2, 0.4)]
    assert 0 < fvds[0] < fvds[1] < fvds[2], fvds


def test_load_i3d_fails_fast_with_instructions(tmp_path):
    with pytest.raises(E.EvalError, match="--i3d") as e:
        E.load_i3d(None)
    assert "wget" in str(e.value) and E.I3D_URL in str(e.value) and "--no-fvd" in str(e.value)
    with pytest.raises(E.EvalError, match="not found") as e:
        E.load_i3d(tmp_path / "nope" / "i3d_torchscript.pt")
    assert "Copy it to the cluster" in str(e.value)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not torchscript")
    with pytest.raises(E.EvalError, match="not a loadable TorchScript"):
        E.load_i3d(junk)


# -------------------------------------------------------------------------------------------- CLIPSIM

COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}


def _color_image_encoder(frames: torch.Tensor) -> torch.Tensor:
    return (frames + 1).mean(dim=(2, 3))  # mean RGB in [0, 2]


def _color_text_encoder(captions) -> torch.Tensor:
    return torch.tensor([[(v + 1) / 2 for v in next(COLORS[w] for w in c.split() if w in COLORS)] for c in captions])


def test_clipsim_matching_beats_shuffled():
    g = torch.Generator().manual_seed(0)
    names = ["red", "green", "blue", "red", "blue", "green"]
    videos = torch.stack([torch.tensor(COLORS[n]).view(1, 3, 1, 1).expand(5, 3, 8, 8) for n in names])
    videos = (videos + 0.1 * torch.randn(videos.shape, generator=g)).clamp(-1, 1)
    captions = [f"a {n} square" for n in names]
    shuffled = captions[1:] + captions[:1]  # every caption now names another colour
    per_video = M.clip_scores(_color_image_encoder, _color_text_encoder, videos, captions)
    assert per_video.shape == (6,) and bool(((per_video > 0.9) & (per_video <= 1 + 1e-6)).all())
    match = M.clipsim(_color_image_encoder, _color_text_encoder, videos, captions)
    other = M.clipsim(_color_image_encoder, _color_text_encoder, videos, shuffled)
    assert -1 <= other < 0.3 < 0.9 < match <= 1 + 1e-6
    with pytest.raises(ValueError, match="captions"):
        M.clipsim(_color_image_encoder, _color_text_encoder, videos, captions[:2])


def test_clipsim_with_tiny_clip_model(scorer):
    g = torch.Generator().manual_seed(1)
    videos = torch.rand(3, 4, 3, 16, 16, generator=g) * 2 - 1
    captions = ["a red circle moving left", "a blue square", "green triangle moves up"]
    assert scorer.preprocess(videos[0]).shape == (4, 3, 32, 32)
    assert scorer.encode_images(videos[0]).shape == (4, 16) and scorer.encode_text(captions).shape == (3, 16)
    per = M.clip_scores(scorer.encode_images, scorer.encode_text, videos, captions)
    assert per.shape == (3,) and bool((per.abs() <= 1).all())
    value = M.clipsim(scorer.encode_images, scorer.encode_text, videos, captions)
    assert -1 <= value <= 1 and value == pytest.approx(float(per.double().mean()))
    assert M.clipsim(scorer.encode_images, scorer.encode_text, videos, captions) == value  # deterministic


def test_load_clip_from_local_folder(clip_folder):
    s = E.load_clip(str(clip_folder))
    assert isinstance(s, E.ClipScorer) and s.name == str(clip_folder)
    assert s.encode_text(["a red circle", "blue"]).shape == (2, 16)
    assert s.encode_images(torch.zeros(2, 3, 16, 16)).shape == (2, 16)


def test_load_clip_fails_fast_with_instructions(tmp_path, clip_folder, no_network):
    # failing fast means not trying the hub: the no_network fixture fails the test on any connection attempt
    with pytest.raises(E.EvalError, match="not available offline") as e:
        E.load_clip("no-such-org/no-such-clip")  # HF_HUB_OFFLINE=1 (conftest): nothing is downloaded
    assert "HF_HOME" in str(e.value) and "--clip /path/to/folder" in str(e.value)
    with pytest.raises(E.EvalError, match="does not exist"):
        E.load_clip(str(tmp_path / "missing" / "clip"))
    # a folder with only the text tower (what text.name may point at) is refused, not silently completed
    from transformers import CLIPTextConfig, CLIPTextModel

    CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, bos_token_id=0, eos_token_id=1, pad_token_id=1)
                  ).save_pretrained(tmp_path / "text-only")
    with pytest.raises(E.EvalError, match="not a full CLIP model"):
        E.load_clip(str(tmp_path / "text-only"))


# ------------------------------------------------------------------------------------ end to end


def test_sample_eval_set_is_fixed_by_seed(run):
    from t2v.data.manifest import read_manifest

    clips = read_manifest(run[0] / "test.jsonl")
    a, caps_a = E.sample_eval_set(clips, 3, seed=5)
    b, caps_b = E.sample_eval_set(clips, 3, seed=5)
    assert [c.id for c in a] == [c.id for c in b] and caps_a == caps_b and len({c.id for c in a}) == 3
    assert all(cap in clip.captions for clip, cap in zip(a, caps_a))
    with pytest.raises(E.EvalError, match="only 4 clips"):
        E.sample_eval_set(clips, 5, seed=0)


def test_evaluate_writes_json_and_is_deterministic(run, scorer, i3d_file):
    data_dir, run_dir = run
    kwargs = dict(clip_model=scorer, i3d=str(i3d_file), steps=2, seed=3, batch_size=3, device="cpu")
    r1 = E.evaluate(run_dir, data_dir / "test.jsonl", 4, **kwargs)
    path = run_dir / "eval" / "step_000002.json"
    assert r1["path"] == str(path) and path.is_file()
    rec = json.loads(path.read_text())
    expected = {"step", "ckpt", "num", "seed", "ddim_steps", "guidance", "clipsim", "fvd", "clip_model", "i3d",
                "frames", "size", "time"}
    assert expected <= rec.keys()
    assert rec["step"] == 2 and rec["num"] == 4 and rec["seed"] == 3 and rec["ddim_steps"] == 2
    assert rec["ckpt"] == str((run_dir / "ckpt_000002.pt").resolve())
    assert rec["frames"] == 4 and rec["size"] == 16 and rec["guidance"] == 3.0  # the checkpoint's config
    assert rec["clip_model"] == "tiny-clip" and rec["i3d"] == str(i3d_file.resolve())
    assert -1 <= rec["clipsim"] <= 1 and math.isfinite(rec["fvd"]) and rec["fvd"] >= 0 and rec["time"] > 0
    r2 = E.evaluate(run_dir, data_dir / "test.jsonl", 4, write=False, **kwargs)
    assert (r2["clipsim"], r2["fvd"]) == (rec["clipsim"], rec["fvd"])  # same seed: identical numbers
    r3 = E.evaluate(run_dir, data_dir / "test.jsonl", 4, write=False, **{**kwargs, "seed": 4})
    assert (r3["clipsim"], r3["fvd"]) != (rec["clipsim"], rec["fvd"])
    # tools/report.py picks the file up
    from tools.report import read_evals

    evals = read_evals(run_dir)
    assert evals["step"].tolist() == [2] and evals["fvd"].tolist() == [rec["fvd"]]


def test_cli(run, clip_folder, i3d_file, capsys):
    data_dir, run_dir = run
    ckpt = run_dir / "ckpt_000002.pt"
    args = ["--ckpt", str(ckpt), "--manifest", str(data_dir / "test.jsonl"), "--num", "3", "--steps", "1",
            "--device", "cpu", "--no-progress", "--seed", "7", "--guidance", "2"]
    assert E.main(args + ["--clip", str(clip_folder), "--no-fvd"]) == 0
    out = capsys.readouterr().out
    assert "CLIPSIM" in out and "FVD" not in out and "step_000002.json" in out
    rec = json.loads((run_dir / "eval" / "step_000002.json").read_text())
    assert rec["fvd"] is None and rec["i3d"] is None and rec["clip_model"] == str(clip_folder)
    assert rec["guidance"] == 2.0 and rec["seed"] == 7 and rec["num"] == 3 and -1 <= rec["clipsim"] <= 1
    assert E.main(args + ["--i3d", str(i3d_file), "--no-clipsim"]) == 0
    rec = json.loads((run_dir / "eval" / "step_000002.json").read_text())
    assert rec["clipsim"] is None and rec["clip_model"] is None and rec["fvd"] >= 0


def test_cli_missing_weights_fail_before_generating(run, clip_folder, capsys, monkeypatch):
    data_dir, run_dir = run
    import t2v.sample

    def no_generation(*a, **k):
        raise AssertionError("generated before checking the weights")

    monkeypatch.setattr(t2v.sample, "generate", no_generation)
    base = ["--ckpt", str(run_dir), "--manifest", str(data_dir / "test.jsonl"), "--num", "2", "--device", "cpu",
            "--no-progress"]
    assert E.main(base + ["--clip", str(clip_folder)]) == 2  # FVD on by default, no --i3d given
    err = capsys.readouterr().err
    assert "no I3D file given (--i3d PATH)" in err and "wget" in err
    assert E.main(base + ["--i3d", str(run_dir / "missing.pt"), "--no-clipsim"]) == 2
    assert "I3D file not found" in capsys.readouterr().err
    assert E.main(base + ["--clip", "no-such-org/no-such-clip", "--no-fvd"]) == 2
    err = capsys.readouterr().err
    assert "not available offline" in err and "HF_HOME" in err
    assert E.main(base + ["--no-fvd", "--no-clipsim"]) == 2
    assert "nothing to compute" in capsys.readouterr().err
