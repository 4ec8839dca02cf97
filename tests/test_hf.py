"""t2v.hf: pretrained models from a hub name or a local folder, offline first, failing fast with instructions."""
import time
from pathlib import Path

import pytest
import torch

from t2v import hf


class LoadError(RuntimeError):
    pass


def tiny_text_model():
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    return CLIPTextModel(CLIPTextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, max_position_embeddings=16))


def test_local_folder_hub_name_or_missing_path(tmp_path):
    assert hf.local_folder(str(tmp_path)) == tmp_path.resolve()
    assert hf.local_folder("openai/clip-vit-base-patch32") is None and hf.local_folder("gpt2") is None
    for looks_like_a_path in (str(tmp_path / "nope"), "./nope", "~/nope", "a/b/c"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            hf.local_folder(looks_like_a_path)


def test_load_pretrained_from_a_local_folder(tmp_path):
    from transformers import CLIPTextModel

    model = tiny_text_model()
    model.save_pretrained(tmp_path / "m" / "text")
    loaded = hf.load_pretrained(CLIPTextModel, str(tmp_path / "m"), what="text model", setting="x.name",
                                error=LoadError, subfolder="text")
    assert isinstance(loaded, CLIPTextModel)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))


def test_load_pretrained_missing_offline_fails_fast_with_instructions(monkeypatch, tmp_path):
    from transformers import CLIPTextModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    with pytest.raises(LoadError) as e:
        hf.load_pretrained(CLIPTextModel, "no-such-org/no-such-model", what="VAE", setting="vae.name",
                           error=LoadError, subfolder="vae")
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "VAE 'no-such-org/no-such-model' is not available offline" in msg and "HF_HOME" in msg
    assert "HF_HUB_OFFLINE=1" in msg and "set vae.name=/path/to/that/folder" in msg
    assert "from transformers import CLIPTextModel; CLIPTextModel.from_pretrained('no-such-org/no-such-model', " \
           "subfolder='vae')" in msg  # the command to run on a login node, with the options that pick the files

    with pytest.raises(LoadError, match="vae.name=.* looks like a local folder but it does not exist"):
        hf.load_pretrained(CLIPTextModel, str(tmp_path / "nope"), what="VAE", setting="vae.name", error=LoadError)


def test_download_only_when_online_and_said_on_stderr(monkeypatch, capsys):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def load(local_only):
        calls.append(local_only)
        if local_only:
            raise OSError("not in the cache")
        return "downloaded"

    assert hf.load_offline_first(load, "org/model", None, "VAE", "HOW", LoadError) == "downloaded"
    assert calls == [True, False] and "downloading it" in capsys.readouterr().err

    def never(local_only):
        raise OSError("no network")

    with pytest.raises(LoadError, match="could not load VAE 'org/model': no network\nHOW"):
        hf.load_offline_first(never, "org/model", None, "VAE", "HOW", LoadError)
    # a local folder that does not load is never a reason to go online
    with pytest.raises(LoadError, match="not available offline: not found in the folder"):
        hf.load_offline_first(never, "./m", Path("."), "VAE", "HOW", LoadError)


def test_offline_variables(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    assert not hf.hf_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "yes")
    assert hf.hf_offline()
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
    assert not hf.hf_offline()
