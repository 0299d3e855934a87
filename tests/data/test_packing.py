"""Packing: exact rows and masks, and a packed loss equal to the documents' losses run one by one."""

import pytest
import torch

from ftune.data.collate import PackedCollator
from ftune.data.mask import IGNORE_INDEX
from ftune.data.packing import block_causal_mask, pack
from ftune.eval.loss import cross_entropy_sum


def doc(ids: list[int], learned_from: int = 0) -> dict:
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * learned_from + ids[learned_from:]}


def test_pack_best_fit_decreasing_rows_positions_and_first_labels():
    rows = pack([doc([1, 2, 3]), doc([4, 5]), doc([6, 7, 8, 9])], max_length=5)
    assert [r["input_ids"] for r in rows] == [[6, 7, 8, 9], [1, 2, 3, 4, 5]]
    assert rows[1]["labels"] == [IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]
    assert rows[1]["position_ids"] == [0, 1, 2, 0, 1]
    assert rows[1]["seq_lens"] == [3, 2]


def test_pack_prefers_the_fullest_row_that_fits():
    # lengths 4, 3, 2, 1 into rows of 5: 4 -> A, 3 -> B, 2 -> B (A has room 1 only), 1 -> A
    rows = pack([doc([1] * 4), doc([2] * 3), doc([3] * 2), doc([4])], max_length=5)
    assert sorted(r["input_ids"] for r in rows) == [[1, 1, 1, 1, 4], [2, 2, 2, 3, 3]]


def test_pack_keeps_every_token_once():
    examples = [doc(list(range(1, n + 1))) for n in (7, 3, 9, 1, 4, 4, 6, 2)]
    rows = pack(examples, max_length=10)
    assert all(len(r["input_ids"]) <= 10 for r in rows)
    assert sorted(n for r in rows for n in r["seq_lens"]) == sorted(len(e["input_ids"]) for e in examples)
    assert sum(len(r["input_ids"]) for r in rows) == sum(len(e["input_ids"]) for e in examples)


def test_block_causal_mask_exact():
    mask = block_causal_mask([[2, 1]], width=4, dtype=None)
    assert mask.shape == (1, 1, 4, 4)
    assert mask[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    additive = block_causal_mask([[2, 1]], width=4, dtype=torch.float32)[0, 0]
    assert (additive[mask[0, 0]] == 0).all() and (additive[~mask[0, 0]] == torch.finfo(torch.float32).min).all()


WINDOW = 4
"""Shorter than most documents below, so sliding layers really slide inside a packed row."""
TOLERANCE = 1e-5
"""Relative gap allowed between packed and unpacked loss (fp32); measured at most 1.1e-7."""
FAMILIES = {
    "llama": {},  # no window
    "mistral": {"sliding_window": WINDOW},  # every layer slides, one mask for all
    "gemma2": {"sliding_window": WINDOW},  # sliding and full layers alternate
    "gemma3_text": {"sliding_window": WINDOW, "sliding_window_pattern": 2},  # every 2nd layer full (old key)
    "qwen2": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},  # layers 1.. slide
    "qwen3": {"use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 1},
    "cohere2": {"sliding_window": WINDOW, "layer_types": ["sliding_attention", "full_attention"]},
}
"""Tiny configs of families whose layers slide, each in its own way of saying which ones, and one without."""


def tiny_config(model_type: str, **settings):
    """The config of `model_type` from its transformers class at tiny sizes (2 layers, hidden 32), with `settings`.

    Weights drawn 10x wider than transformers' default make attention sharp enough that what a layer sees
    changes the loss measurably.
    """
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                                pad_token_id=0, eos_token_id=1, bos_token_id=2, initializer_range=0.2, **settings)


def random_family(model_type: str, attn: str, **settings):
    """A tiny random causal LM of `model_type` (fp32, eval mode) built from `tiny_config`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **settings), attn_implementation=attn).eval()


def kernels(model_type: str, **settings) -> list[str]:
    """The CPU attention kernels ftune allows for the config: eager, and sdpa unless it cannot run it."""
    from ftune.config.architecture import sdpa_problem

    return ["eager"] + ([] if sdpa_problem(tiny_config(model_type, **settings).to_dict()) else ["sdpa"])


def packed_and_alone_losses(model, attn: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-weighted mean loss of documents packed into rows of 16, and of the same documents run one by one."""
    torch.manual_seed(0)
    lengths = [5, 9, 3, 12, 7, 6, 2, 11]
    documents = [doc(torch.randint(1, 64, (n,)).tolist(), learned_from=n // 3) for n in lengths]
    rows = pack(documents, max_length=16)
    assert len(rows) < len(documents)  # really packed
    batch = PackedCollator(pad_token_id=0, attn_implementation=attn, pad_to_multiple_of=8)(rows)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        packed_sum = cross_entropy_sum(logits, batch["labels"])
        alone_sum = sum(
            cross_entropy_sum(model(input_ids=torch.tensor([d["input_ids"]])).logits, torch.tensor([d["labels"]]))
            for d in documents
        )
    packed_count = (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    alone_count = sum(sum(label != IGNORE_INDEX for label in d["labels"][1:]) for d in documents)
    assert packed_count == alone_count
    return packed_sum / packed_count, alone_sum / alone_count


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_loss_of_documents_run_alone(random_llama, attn):
    packed, alone = packed_and_alone_losses(random_llama(attn=attn).eval(), attn)  # a Llama has no window
    torch.testing.assert_close(packed, alone, rtol=TOLERANCE, atol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_packed_loss_equals_unpacked_loss_with_per_layer_masks_on_every_cpu_kernel(family):
    from ftune.model.instrument import instrument

    settings = FAMILIES[family]
    for attn in kernels(family, **settings):
        model = random_family(family, attn, **settings)
        instrument(model)
        packed, alone = packed_and_alone_losses(model, attn)
        torch.testing.assert_close(packed, alone, rtol=TOLERANCE, atol=0, msg=f"{family} on {attn}")


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3_text", "qwen2", "qwen3", "cohere2"])
def test_the_block_mask_alone_would_let_sliding_layers_see_their_whole_document(family):
    """What the per-layer masks prevent: transformers uses a 4D mask as it is, in sliding layers too.

    Measured gaps: 6e-4 (Cohere 2) to 3e-2 (Mistral).
    """
    packed, alone = packed_and_alone_losses(random_family(family, "eager", **FAMILIES[family]), "eager")
    assert abs(packed - alone) / alone > 10 * TOLERANCE


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_position_ids_alone_leak_across_documents(random_llama, attn):
    """Why the 4D mask exists: with restarting positions but a plain mask, documents attend to each other."""
    model = random_llama(attn=attn).eval()
    documents = [doc([5, 6, 7, 8]), doc([9, 10, 11])]
    rows = pack(documents, max_length=8)
    batch = PackedCollator(pad_token_id=0, attn_implementation=attn)(rows)
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 4:7]
        alone = model(input_ids=torch.tensor([[9, 10, 11]])).logits[0]
    assert (leaky - alone).abs().max() > 1e-3
