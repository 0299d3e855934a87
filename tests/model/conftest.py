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
