"""Vocabulary extension (`model.add_tokens`, `model.add_special_tokens`): new tokens, and rows for them.

The tokenizer gains the tokens before any data is tokenized; the input embedding and the output head gain one row
per token, each exactly the mean of the rows the tokenizer's tokens already had. A new row at the mean gives its
token about the average logit, so the model's distribution over the old tokens hardly moves before the new rows
have trained, where a random row can give the new token an outsized share of every prediction (Hewitt, 2021,
"Initializing new word embeddings for pretrained language models"). transformers'
`resize_token_embeddings(mean_resizing=True)` draws the rows from a normal distribution around that mean instead,
so they are neither the mean nor the same twice: ftune grows the matrices with it and sets the rows itself.
"""

import torch

from ftune.config.schema import ModelCfg
from ftune.config.validate import known_token_problems
from ftune.errors import ConfigError


def adds_tokens(cfg: ModelCfg) -> bool:
    """Whether the run adds tokens to the tokenizer."""
    return bool(cfg.add_tokens or cfg.add_special_tokens)


def extend_tokenizer(tokenizer, cfg: ModelCfg) -> None:
    """Add `model.add_tokens` (never split) and `model.add_special_tokens` (also skipped in decoding) to `tokenizer`.

    Raises:
        ConfigError: the tokenizer already has one of them (validation checks a local model's tokenizer; a hub
            model's is checked here, as it loads, before any weights do).
    """
    if problems := known_token_problems(cfg, set(tokenizer.get_vocab())):
        raise ConfigError("; ".join(problems))
    tokenizer.add_tokens(list(cfg.add_tokens))
    if cfg.add_special_tokens:
        tokenizer.add_special_tokens({"extra_special_tokens": list(cfg.add_special_tokens)},
                                     replace_extra_special_tokens=False)


def added_token_ids(tokenizer, cfg: ModelCfg) -> list[int]:
    """The ids `tokenizer` (extended by `extend_tokenizer`) gives the added tokens, in the config's order."""
    return tokenizer.convert_tokens_to_ids([*cfg.add_tokens, *cfg.add_special_tokens])


def extend_embeddings(model: torch.nn.Module, ids: list[int]) -> None:
    """Give the input embedding and the output head a row for each of `ids`, each the mean of the rows before them.

    The rows before the first new id are those of the tokens the tokenizer had; a matrix padded beyond them
    (Qwen2.5: 151,665 tokens in 151,936 rows) keeps its size, and its untrained spare rows are neither averaged
    nor kept for the new tokens. A tied head is the embedding's own Parameter, and stays so.
    """
    if not ids:
        return
    if max(ids) >= model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(max(ids) + 1, mean_resizing=False)  # new rows are set below
    index = torch.tensor(ids)
    with torch.no_grad():
        for weight in embedding_matrices(model):
            mean = weight[: min(ids)].float().mean(dim=0)
            weight[index.to(weight.device)] = mean.to(weight.dtype)


def grow_to_tokenizer(model: torch.nn.Module, tokenizer) -> None:
    """Rows for every id of `tokenizer` (an adapter's, which may hold tokens its base lacks), before the adapter loads.

    What `AutoPeftModelForCausalLM.from_pretrained` does to the base, with the new rows at the mean rather than
    random: the adapter then replaces them with its trained rows (`trainable_token_indices`, or a saved embedding).
    """
    rows = model.get_input_embeddings().weight.shape[0]
    extend_embeddings(model, list(range(rows, len(tokenizer))))


def embedding_matrices(model: torch.nn.Module) -> list[torch.Tensor]:
    """The input embedding's weight and the output head's, once each (a tied head is the same tensor)."""
    head = model.get_output_embeddings()
    weights = [model.get_input_embeddings().weight, *([head.weight] if head is not None else [])]
    return list({id(weight): weight for weight in weights}.values())
