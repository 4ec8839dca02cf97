"""Shared test setup: no network, deterministic threads, helpers to make small real videos."""
import os

# Model weights cannot come from a hub here (and a silent offline CLIP tokenizer is a known trap).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
