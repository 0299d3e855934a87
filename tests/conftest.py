"""Shared fixtures: the embedded model's location and tiny random models for fast numerical tests.

Before anything imports ftune, the session gets a cache of its own (`FTUNE_CACHE`, which the processes that
tests start inherit): tests must neither be served the user's cached data, built by other code, nor fill
`~/.cache/ftune`. Tests that need a cold cache still set their own with `monkeypatch.setenv`.
"""

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
SESSION_CACHE = tempfile.mkdtemp(prefix="ftune-test-cache-")
os.environ["FTUNE_CACHE"] = SESSION_CACHE  # not setdefault: a FTUNE_CACHE of the user's shell is theirs too

ASSETS = Path(__file__).resolve().parents[1] / "ftune" / "assets"
TINY_MODEL = ASSETS / "models" / "tiny"


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """The embedded model (built by scripts/build_tiny_model.py and shipped in the package)."""
    return TINY_MODEL


@pytest.fixture
def random_llama():
    """A factory of tiny random Llamas (2 layers, hidden 16) in fp32, seeded for reproducibility."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(vocab_size: int = 64, attn: str = "sdpa", seed: int = 0) -> LlamaForCausalLM:
        torch.manual_seed(seed)
        config = LlamaConfig(
            vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0,
        )
        config._attn_implementation = attn
        return LlamaForCausalLM(config).float()

    return make


def built_once(tmp_path_factory, module: str):
    """A factory that builds a tiny model with `scripts/<module>.py`'s `build(name, out, base)`, once per name."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))  # scripts/ is not a package
    builder, tiny_arch = importlib.import_module(module), importlib.import_module("tiny_arch")
    out, built, base = tmp_path_factory.mktemp(module), {}, tiny_arch.base_tokenizer()

    def build(name: str) -> Path:
        if name not in built:
            built[name] = builder.build(name, out, base)
        return built[name]

    return build


@pytest.fixture(scope="session")
def tiny_arch(tmp_path_factory):
    """A factory of tiny random models of real families (scripts/tiny_arch.py), each built once per session."""
    return built_once(tmp_path_factory, "tiny_arch")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory):
    """A factory of tiny random models of any causal-LM architecture (scripts/arch_zoo.py), each built once."""
    return built_once(tmp_path_factory, "arch_zoo")


def pytest_unconfigure(config):
    """Remove the session's cache when pytest exits."""
    shutil.rmtree(SESSION_CACHE, ignore_errors=True)
