"""Loading pretrained Hugging Face models on a cluster whose compute nodes have no internet.

Every pretrained model the toolkit loads (the CLIP text encoder of ``t2v.text``, the CLIP model that scores
CLIPSIM in ``t2v.eval``, and next diffusers' AutoencoderKL) goes through here, so they all behave alike:

  * ``name`` is a hub name (``org/model``) or a local folder written by ``save_pretrained``. A name that looks
    like a path but is not a folder is an error at once: a typo in a path must not turn into a hub lookup.
  * The local Hugging Face cache (or the folder) is tried first with ``local_files_only=True``: fast, and the
    only thing that works on a compute node.
  * A download is attempted only when that fails, we are online (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE unset)
    and ``name`` is a hub name; a line on stderr says so, because on a compute node without internet
    ``from_pretrained`` would retry the network for minutes instead of failing.
  * Every failure raises the caller's error type, saying where we looked, followed by ``how``: the caller's
    instructions for fetching the model on a login node (``how_to_fetch`` writes generic ones).

``load_pretrained`` loads one ``from_pretrained``-style class. Callers that load several things that must come
from the same place (a model and its tokenizer) give ``load_offline_first`` a ``load(local_only)`` function.
A tokenizer loaded offline from a name that is not cached can be a silent placeholder instead of an error;
``MIN_TOKENIZER_VOCAB`` is the size below which callers refuse one, and ``hf_tokenize`` adapts a tokenizer to
the ``tokenize(captions, max_tokens)`` function the encoders take.
"""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

# A real CLIP tokenizer has 49,408 tokens. The offline trap (CLIPTokenizer.from_pretrained of a hub name
# that is not cached, under HF_HUB_OFFLINE=1) silently returns one with 2, which encodes everything as unk.
MIN_TOKENIZER_VOCAB = 1000


def hf_offline() -> bool:
    """Whether the environment forbids downloads (the variables huggingface_hub and transformers read)."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def looks_like_hub_name(name: str) -> bool:
    """``org/model`` or ``model``: something the hub could serve (used to write a fetch command for it)."""
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name))


def local_folder(name: str) -> Path | None:
    """The resolved local model folder ``name`` names, or None for a hub name.

    Raises FileNotFoundError when ``name`` looks like a path (starts with /, ./, ../ or ~, or has more than
    one /, which no hub name has) but is not a folder; callers turn it into their own error and advice."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p.resolve()
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name!r} looks like a local folder but it does not exist")
    return None


def load_offline_first(load: Callable[[bool], Any], name: str, folder: Path | None, what: str, how: str,
                       error: type[Exception]) -> Any:
    """``load(local_only)`` against the local Hugging Face cache first (fast, and right on compute nodes without
    internet); a download only when online and ``name`` is a hub name. Failures raise ``error`` saying where we
    looked, followed by ``how`` (instructions to get the weights onto the cluster)."""
    try:
        return load(True)
    except (OSError, ValueError) as first:
        if folder is not None or hf_offline():
            where = f"the folder {folder}" if folder else (
                f"the Hugging Face cache (HF_HOME={os.environ.get('HF_HOME', '<unset: ~/.cache/huggingface>')})")
            raise error(f"{what} {name!r} is not available offline: not found in {where} "
                        f"({type(first).__name__}: {str(first).splitlines()[0][:200]}).\n" + how) from None
    print(f"t2v: {what} {name!r} is not in the local Hugging Face cache; downloading it. On a compute node "
          "without internet this retries for minutes: set HF_HUB_OFFLINE=1 there.", file=sys.stderr)
    try:
        return load(False)
    except (OSError, ValueError) as e:
        raise error(f"could not load {what} {name!r}: {str(e).splitlines()[0][:300]}\n" + how) from None


def how_to_fetch(what: str, fetch: str, setting: str) -> str:
    """Generic instructions for getting a model onto compute nodes: ``fetch`` is the Python statement that
    downloads it on a login node, ``setting`` the config key that names it (``vae.name``, ``text.name``, ...)."""
    return (
        f"How to get the {what} onto a compute node without internet:\n"
        "  1. On a login node (which has internet), with HF_HOME pointing at a shared scratch folder, run once:\n"
        "       export HF_HOME=/scratch/$USER/hf\n"
        f"       python -c \"{fetch}\"\n"
        "  2. In the job script: export HF_HOME=/scratch/$USER/hf HF_HUB_OFFLINE=1\n"
        f"  Or save it with save_pretrained into a folder and set {setting}=/path/to/that/folder."
    )


def fetch_statement(cls: type, name: str, **options: Any) -> str:
    """``from pkg import Cls; Cls.from_pretrained('name', ...)`` for ``how_to_fetch``. String options
    (subfolder, revision, variant) choose which files are downloaded, so the statement repeats them."""
    hub = name if looks_like_hub_name(name) else "<hub name>"
    extra = "".join(f", {k}={v!r}" for k, v in options.items() if isinstance(v, str))
    package = cls.__module__.split(".")[0]
    return f"from {package} import {cls.__name__}; {cls.__name__}.from_pretrained('{hub}'{extra})"


def load_pretrained(cls: type, name: str, *, what: str, setting: str, error: type[Exception],
                    how: str | None = None, **options: Any) -> Any:
    """``cls.from_pretrained`` of a hub name or a local folder, offline first (see the module docstring).

    ``what`` names the model in messages ("VAE"), ``setting`` the option the user sets to point at a folder,
    ``error`` is the exception raised (with ``how``, by default generic fetch instructions); ``options`` go to
    ``from_pretrained`` (e.g. ``subfolder="vae"``, ``torch_dtype``)."""
    name = str(name)
    if how is None:
        how = how_to_fetch(what, fetch_statement(cls, name, **options), setting)
    try:
        folder = local_folder(name)
    except FileNotFoundError:
        raise error(f"{setting}={name!r} looks like a local folder but it does not exist.\n" + how) from None
    source = str(folder) if folder else name
    return load_offline_first(lambda local_only: cls.from_pretrained(source, local_files_only=local_only, **options),
                              name, folder, what, how, error)


def snapshot(name: str, *, what: str, setting: str, error: type[Exception], how: str) -> Path:
    """The local folder of a whole hub repository (a diffusers pipeline: model_index.json, transformer/, vae/, ...)
    or ``name`` itself when it is a folder, offline first like ``load_pretrained``. Everything a pretrained family
    loads then comes from this one folder, and the weights a run started from can be hashed (t2v.models)."""
    name = str(name)
    try:
        folder = local_folder(name)
    except FileNotFoundError:
        raise error(f"{setting}={name!r} looks like a local folder but it does not exist.\n" + how) from None
    if folder is not None:
        return folder

    def load(local_only: bool) -> Path:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=local_only))

    return load_offline_first(load, name, None, what, how, error)


def hf_tokenize(tokenizer) -> Callable:
    """A Hugging Face tokenizer as ``tokenize(captions, max_tokens) -> (input_ids, attention_mask)``: padded to the
    longest caption of the batch (on the tokenizer's padding side: the right for CLIP), truncated to ``max_tokens``."""
    def tokenize(captions: Sequence[str], max_tokens: int):
        out = tokenizer(list(captions), padding=True, truncation=True, max_length=max_tokens, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]

    return tokenize
