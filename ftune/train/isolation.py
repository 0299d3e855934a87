"""Packed rows keep their documents apart on the model that will train: checked on it, not assumed from a list.

A block-diagonal mask isolates documents only in layers that attend through it. A layer that carries state along
the row (Mamba and other recurrent or linear-attention layers, causal convolutions), modelling code that builds
its own mask or bias from a 2-D one (BLOOM's ALiBi) or ignores `position_ids`, lets one document see another, and
the loss is then silently wrong. Which architectures do is a fact of each release's modelling code, so before any
training ftune runs two short documents packed into one row and each alone, and refuses packing in one line where
the second document's logits differ. DPO's one-row pairs (`pref.share_prompt`) and GRPO's one-row groups
(`grpo.share_prompt`) are probed the same way, on a pair (a group of two), and a model that fails gets a row per
response instead (`prompt_sharing_problem`).
"""

import dataclasses

import torch
from accelerate.utils import send_to_device

from ftune.data.collate import PackedCollator, PairCollator
from ftune.data.packing import pack
from ftune.errors import ConfigError, first_line
from ftune.model.adapters import prepends_virtual_tokens
from ftune.model.dropout import eval_mode

PROBE_LENGTHS = (24, 16)
"""Tokens of the two probe documents: short (the check costs two forwards of 40 tokens), longer than a conv."""
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
"""Largest logit gap, relative to the largest logit, that is rounding: fp32; any 16-bit dtype gets `HALF`."""
HALF = 2e-2


def check_packing_isolates(model: torch.nn.Module, pad_token_id: int, attn_implementation: str,
                           name_or_path: str) -> None:
    """Refuse `data.packing=true` on a model where a packed row's documents see each other.

    Args:
        model: the model as it will train (adapters and ftune's mask hooks in place), on its device.
        pad_token_id: the tokenizer's padding id (the collator's).
        attn_implementation: the attention kernel the run uses (`model.attn_implementation`).
        name_or_path: the model, for the message.

    Raises:
        ConfigError: the gap, or the error the modelling code raised on a packed row, and the way out.
    """
    if sharded_at_load():
        return
    try:
        gap = packing_gap(model, pad_token_id, attn_implementation)
    except ConfigError:  # ftune's own mask code refusing a layer kind it cannot mask (model/attention.py)
        raise
    except Exception as err:  # noqa: BLE001 -- the model's own code on a packed row, whatever it raises
        gap_text = f"its forward fails on a packed row ({first_line(err, 160)})"
    else:
        if gap <= TOLERANCE.get(model.get_input_embeddings().weight.dtype, HALF):
            return
        gap_text = f"a packed document's logits differ from its own by {gap:.1e} of the largest logit"
    raise ConfigError(f"data.packing=true with model.name_or_path={name_or_path}: {gap_text}: this architecture's "
                      "layers do not keep packed documents apart", "set data.packing=false")


def sharded_at_load() -> bool:
    """Whether this process holds only a shard of the weights before the run wraps the model.

    ZeRO-3 with `zero3_init_flag` partitions every weight as it loads, and FSDP's `cpu_ram_efficient_loading`
    leaves all ranks but the first on the meta device: no rank can run the model's forward until accelerate wraps
    it, and a check on one rank only would leave the others waiting. The same model on one GPU (or DDP) is checked.
    """
    from transformers.integrations import is_deepspeed_zero3_enabled, is_fsdp_enabled

    return is_deepspeed_zero3_enabled() or is_fsdp_enabled()


def packing_gap(model: torch.nn.Module, pad_token_id: int, attn_implementation: str) -> float:
    """The largest |packed - alone| logit of two random documents, over the largest logit, in eval mode (no dropout)."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    docs = [torch.randint(0, vocab, (length,), generator=generator).tolist() for length in PROBE_LENGTHS]
    (row,) = pack([{"input_ids": doc, "labels": doc} for doc in docs], max_length=sum(PROBE_LENGTHS))
    batch = PackedCollator(pad_token_id, attn_implementation)([row])  # as the run's own collator builds it
    device = model.get_input_embeddings().weight.device
    inputs = {key: batch[key].to(device) for key in ("input_ids", "attention_mask", "position_ids") if key in batch}
    with eval_mode(model), torch.no_grad():
        packed = model(**inputs).logits[0].float()
        starts = [sum(row["seq_lens"][:index]) for index in range(len(row["seq_lens"]))]
        gaps, largest = [], 0.0
        for start, length in zip(starts, row["seq_lens"], strict=True):
            ids = batch["input_ids"][:, start:start + length].to(device)
            alone = model(input_ids=ids).logits[0].float()
            gaps.append((packed[start:start + length] - alone).abs().max().item())
            largest = max(largest, alone.abs().max().item())
    return max(gaps) / max(largest, 1e-9)


PROBE_PAIRS = ((12, 5, 7), (6, 9, 3))
"""Prompt, chosen and rejected lengths of the two random pairs `shared_prompt_gap` scores both ways."""


def prompt_sharing_problem(cfg, model: torch.nn.Module, logps, collator: PairCollator) -> str | None:
    """Why DPO's pairs (or GRPO's groups) cannot each share one row with their prompt on this model, or None.

    The one-row layout (`shared_prompt_rows`) is only right where every layer attends through the 4D mask and reads
    `position_ids`: as with packing, that is checked on the model as it trains (adapters, hooks), on a probe, not
    assumed from a list. Nothing is refused: a model that fails gets a row per response.

    Args:
        cfg: the run's config (`pref.share_prompt`, or `grpo.share_prompt` with objective=grpo; the attention, the
            method).
        model: the policy as it trains, unwrapped, on its device.
        logps: the run's `SequenceLogps`.
        collator: the run's pair collator (its padding settings).
    """
    attn, section = cfg.model.attn_implementation, "grpo" if cfg.objective.name == "grpo" else "pref"
    if not getattr(cfg, section).share_prompt:
        return f"{section}.share_prompt=false"
    if attn == "flash_attention_2":
        return "flash_attention_2 takes no 4D mask"
    if prepends_virtual_tokens(model):
        return f"method={cfg.method.name} prepends virtual tokens"
    try:
        gap = shared_prompt_gap(model, logps, collator, attn)
    except Exception as err:  # noqa: BLE001 -- the model's own code on a shared-prompt row, whatever it raises
        return f"its forward fails on a one-row pair: {first_line(err, 160)}"
    if gap > TOLERANCE.get(model.get_input_embeddings().weight.dtype, HALF):
        return f"a probe pair's log-probs in one row differ from two rows' by {gap:.1e} of their size"
    return None


def shared_prompt_gap(model: torch.nn.Module, logps, collator: PairCollator, attn_implementation: str) -> float:
    """The largest |one row - two rows| sequence log-prob of two random pairs, over the largest one, in eval mode."""
    generator = torch.Generator().manual_seed(0)
    vocab = model.get_input_embeddings().weight.shape[0]
    rows = [{key: torch.randint(0, vocab, (length,), generator=generator).tolist()
             for key, length in zip(("prompt_ids", "chosen_ids", "rejected_ids"), lengths, strict=True)}
            for lengths in PROBE_PAIRS]
    device = model.get_input_embeddings().weight.device
    layouts = [dataclasses.replace(collator, shared_mask=mask) for mask in (attn_implementation, None)]
    with eval_mode(model), torch.no_grad():
        shared, alone = (logps(model, send_to_device(layout(rows), device))[0].float() for layout in layouts)
    return ((shared - alone).abs().max() / alone.abs().max().clamp(min=1e-9)).item()
