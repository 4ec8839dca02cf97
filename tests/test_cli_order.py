"""`python -m t2v.data check|cache|latents` and `python -m t2v.text embed` take MANIFEST, --config F, key=value
overrides and their own options in any order, and refuse a bad argument before a clip is decoded or a caption
encoded.

A new user wrote `check MANIFEST --config F data.sampling=window data.fps=8` (as the README showed it): every clip
was decoded, then argparse refused the overrides. Each test here runs the commands' main() in-process on the demo
data (4 training clips of 16 frames, 64x64) with configs/tiny.yaml.
"""
from __future__ import annotations

import itertools
import re
import shutil

import pytest

from runs import REPO
from t2v import config as C
from t2v.data import __main__ as data_cli
from t2v.data.demo import make_demo
from t2v.text import cli as text_cli

TINY = str(REPO / "configs/tiny.yaml")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("order")
    paths = make_demo(d, n_train=4, n_val=2, n_test=2)
    return {"dir": d, "train": str(paths["train"]), "val": str(paths["val"])}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The baseline's variables ($MANIFEST, $FRAMES, ...) and $CONFIG must not decide what the tests resolve."""
    for var in ("CONFIG", *C.ENV_VARS):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def no_decoding(monkeypatch):
    """Every decoder and encoder the four commands reach raises: what runs with it has refused before any work."""
    import t2v.data.cache
    import t2v.data.latents
    import t2v.data.video
    import t2v.data.window_build
    import t2v.data.windows
    import t2v.vae

    def forbidden(*args, **kwargs):
        raise AssertionError("decoded or encoded before every argument was checked")

    for module, names in [(t2v.data.video, ("decode_uint8", "decode_frames", "read_timeline")),
                          (t2v.data.cache, ("decode_uint8",)), (t2v.data.latents, ("decode_uint8",)),
                          (t2v.data.windows, ("decode_frames", "read_timeline")),
                          (t2v.data.window_build, ("read_timeline",)), (t2v.vae, ("load_vae",)),
                          (text_cli, ("embed_captions", "embed_shard", "merge_embedding_shards"))]:
        for name in names:
            monkeypatch.setattr(module, name, forbidden)


def orders(*units):
    """Every order of the argument groups, flattened: ("M", ("--config", F)) -> [M, --config, F], [--config, F, M]."""
    return [[a for unit in order for a in ((unit,) if isinstance(unit, str) else unit)]
            for order in itertools.permutations(units)]


def run(main, argv, capsys):
    """(exit status, stdout with the timings cut, stderr) of one in-process run."""
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, re.sub(r"[\d.]+ s\b", "T s", out), err


# ------------------------------------------------------------------------------------------ the same in any order


@pytest.mark.parametrize("frames, status, summary", [("4", 0, "4 line(s), no problems"),
                                                     ("17", 1, "4 bad line(s) out of 4: 4 too_short")])
def test_check_gives_the_same_result_in_every_order(demo, capsys, frames, status, summary):
    """data.frames=4 passes, data.frames=17 (one more than the demo's 16) fails every line, whichever the order: the
    override is applied wherever it stands, --video-root among the rest included."""
    results = set()
    for argv in orders(demo["train"], ("--config", TINY), f"data.frames={frames}", ("--video-root", str(demo["dir"]))):
        rc, out, err = run(data_cli.main, ["check", *argv], capsys)
        assert rc == status, (argv, err)
        assert f"{demo['train']}: {summary}" in out
        results.add(out)
    assert len(results) == 1


def test_cache_builds_the_same_file_in_every_order_as_data_manifest_does(demo, capsys, tmp_path):
    """A positional MANIFEST means data.manifest=MANIFEST: every order, the documented form with data.manifest= and
    the same path given both ways print the same cache file (4 clips at data.size=8)."""
    common = [f"data.cache_dir={tmp_path}", "data.size=8"]
    documented = ["cache", "--config", TINY, f"data.manifest={demo['train']}", *common]
    rc, expected, err = run(data_cli.main, documented, capsys)
    assert rc == 0, err
    assert re.search(rf"clip cache: {tmp_path}/clips_\w+\.npy \(4 clips of 4x8x8, 0 bad", expected)
    for argv in [*orders(demo["train"], ("--config", TINY), common[0], common[1], ("--workers", "1")),
                 [f"data.manifest={demo['train']}", "--config", TINY, *common, demo["train"]]]:
        assert run(data_cli.main, ["cache", *argv], capsys)[:2] == (0, expected), argv
    assert len(list(tmp_path.glob("clips_*.npy"))) == 1


def test_a_file_whose_name_looks_like_an_override_is_the_manifest(demo, capsys, monkeypatch):
    """An argument with = is an override unless it is an existing file: `check data.fps=8.jsonl` checks that file."""
    monkeypatch.chdir(demo["dir"])
    shutil.copy(demo["train"], "data.fps=8.jsonl")
    rc, out, err = run(data_cli.main, ["check", "data.fps=8.jsonl"], capsys)
    assert rc == 0, err
    assert "data.fps=8.jsonl: 4 line(s), no problems" in out


def test_embed_gives_the_same_cache_in_every_order_as_data_manifest_does(demo, capsys, tmp_path):
    """`embed MANIFEST` embeds the captions of MANIFEST (and its val.jsonl), like data.manifest=MANIFEST, in every
    order of MANIFEST, --config, overrides and options; --manifest PATH still adds another manifest."""
    common = [f"text.cache_dir={tmp_path}", "text.dim=32"]
    documented = ["embed", "--config", TINY, f"data.manifest={demo['train']}", *common, "--no-progress"]
    rc, out, err = run(text_cli.main, documented, capsys)
    assert rc == 0 and "0 already cached" in out and "encoder hash:32 (32-d)" in out, err
    rc, expected, err = run(text_cli.main, documented, capsys)  # what every later run prints: nothing new
    assert rc == 0 and "0 newly encoded" in expected, err
    for argv in orders(demo["train"], ("--config", TINY), *common, "--no-progress"):
        assert run(text_cli.main, ["embed", *argv], capsys)[:2] == (0, expected), argv
    assert len(list(tmp_path.glob("text_*.pt"))) == 1
    extra = tmp_path / "extra.jsonl"
    extra.write_text('{"video": "x.mp4", "caption": "a caption no demo clip has"}\n')
    rc, out, err = run(text_cli.main, ["embed", "--manifest", str(extra), *common, demo["train"], "--config", TINY,
                                       "--no-progress"], capsys)
    assert rc == 0 and "1 newly encoded" in out, err


def test_latents_gives_the_same_cache_in_every_order(demo, capsys, tmp_path):
    """The latent cache of a tiny VAE: the same files whichever the order of MANIFEST, --config and overrides."""
    from test_latent import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    common = [f"data.cache_dir={tmp_path / 'cache'}", f"vae.name={tmp_path / 'vae'}", "train.device=cpu"]
    rc, expected, err = run(data_cli.main, ["latents", "--config", TINY, f"data.manifest={demo['train']}", *common],
                            capsys)
    assert rc == 0, err
    assert expected.count("latent cache:") == 2 and f"4 clips of {demo['train']}" in expected
    for argv in [[demo["train"], "--config", TINY, *common], [*common, demo["train"], "--config", TINY],
                 ["--config", TINY, common[0], demo["train"], *common[1:]]]:
        assert run(data_cli.main, ["latents", *argv], capsys)[:2] == (0, expected), argv


# ------------------------------------------------------------------------------------ refused before any work


COMMANDS = [("check", data_cli.main, ["data.sampling=window", "data.fps=8"]), ("cache", data_cli.main, []),
            ("latents", data_cli.main, []), ("embed", text_cli.main, [])]


@pytest.mark.parametrize("command, main, extra", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_an_unknown_key_fails_before_anything_is_decoded(demo, capsys, tmp_path, no_decoding, command, main, extra):
    """The new user's line with a typo, in three orders: exit 2, the key named, no traceback, nothing decoded."""
    with pytest.raises(AssertionError, match="decoded or encoded"):  # without the typo, the work starts
        main([command, demo["train"], "--config", TINY, *extra, f"data.cache_dir={tmp_path}",
              f"text.cache_dir={tmp_path}"])
    capsys.readouterr()
    for argv in ([demo["train"], "--config", TINY, *extra, "data.fsp=8"],
                 ["data.fsp=8", *extra, demo["train"], "--config", TINY],
                 ["--config", TINY, "data.fsp=8", demo["train"], *extra]):
        rc, out, err = run(main, [command, *argv], capsys)
        assert rc == 2, argv
        assert err.startswith("error: argument 'data.fsp=8': unknown config key 'data.fsp'") and "Traceback" not in err


@pytest.mark.parametrize("command, main, extra", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_two_manifests_fail_naming_both(demo, capsys, no_decoding, command, main, extra):
    """Two positional manifests, or one that contradicts data.manifest=: exit 2 with both paths, nothing decoded."""
    explicit = f"data.manifest={demo['val']}"
    for argv, second in (([demo["train"], "--config", TINY, *extra, demo["val"]], demo["val"]),
                         ([explicit, "--config", TINY, demo["train"]], explicit)):
        rc, out, err = run(main, [command, *argv], capsys)
        assert rc == 2, argv
        assert err == f"error: two manifests given: {demo['train']} and {second}; give one" + (
            " (config overrides are written key=value, e.g. data.fps=8)\n" if second == demo["val"] else "\n")


@pytest.mark.parametrize("command, main, extra", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_an_override_without_equals_is_a_manifest_not_found(demo, capsys, no_decoding, command, main, extra):
    """`data.fps` with no =: not an existing file, so it is taken for the manifest and refused, saying how overrides
    are written; beside a real manifest it is a second manifest."""
    rc, out, err = run(main, [command, "--config", TINY, *extra, "data.fps"], capsys)
    assert rc == 2
    assert err == "error: manifest not found: data.fps (config overrides are written key=value, e.g. data.fps=8)\n"
    rc, out, err = run(main, [command, demo["train"], "--config", TINY, *extra, "data.fps"], capsys)
    assert rc == 2 and f"two manifests given: {demo['train']} and data.fps" in err and "key=value" in err


@pytest.mark.parametrize("command, main", [("check", data_cli.main), ("cache", data_cli.main),
                                           ("embed", text_cli.main)])
def test_a_bad_option_fails_in_argparse_before_anything_is_decoded(demo, capsys, no_decoding, command, main):
    """An option argparse refuses (a --shard that is not I/N; an unknown option), after or before the positionals."""
    for argv in ([demo["train"], "--config", TINY, "data.size=8", "--shard", "x"],
                 ["--no-such-option", demo["train"], "--config", TINY]):
        with pytest.raises(SystemExit) as e:
            main([command, *argv])
        assert e.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


def test_split_positionals():
    """The shared rule on its own: key=value with a key-like left side is an override, anything else the manifest."""
    assert C.split_positionals([]) == ("", [])
    assert C.split_positionals(["data.fps=8", "train.lr=1e-4"]) == ("", ["data.fps=8", "train.lr=1e-4"])
    with pytest.raises(C.ConfigError, match="manifest not found: a/b=c.jsonl"):  # a path, whatever its =
        C.split_positionals(["data.fps=8", "a/b=c.jsonl"])
    with pytest.raises(C.ConfigError, match="two manifests given: x.jsonl and y.jsonl"):
        C.split_positionals(["x.jsonl", "data.fps=8", "y.jsonl"])
