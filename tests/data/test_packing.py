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


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_loss_equals_token_weighted_loss_of_documents_run_alone(random_llama, attn):
    torch.manual_seed(0)
    model = random_llama(attn=attn).eval()
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
    torch.testing.assert_close(packed_sum / packed_count, alone_sum / alone_count, rtol=1e-5, atol=0)


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
