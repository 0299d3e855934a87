"""Model directories on disk (weights, config and tokenizer), as `from_pretrained` loads them."""

import pytest


@pytest.fixture
def save_llama(random_llama, tmp_path):
    """A factory that saves a tiny random Llama with a word-level tokenizer of `vocab` into a directory."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    def save(name: str, vocab: list[str], vocab_size: int = 64, eos: str = "<eos>"):
        words = ["<pad>", "<unk>", "<eos>", "<bos>", *vocab]
        backend = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
        backend.pre_tokenizer = WhitespaceSplit()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                            eos_token=eos, bos_token="<bos>")
        path = tmp_path / name
        random_llama(vocab_size=vocab_size).save_pretrained(path)
        tokenizer.save_pretrained(path)
        return path

    return save


def built_once(tmp_path_factory, module: str):
    """A factory that builds a tiny model with `scripts/<module>.py`'s `build(name, out, base)`, once per name."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # scripts/ is not a package
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
