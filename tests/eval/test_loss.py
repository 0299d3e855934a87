"""`evaluate_loss` against a hand computation on a tiny random Llama.

The loss must be per learned token over the whole evaluation (sum of token cross-entropies / their count), not a
mean of batch means: with batches of different learned-token counts the two differ, and only the first is
comparable across batch sizes, packing and ranks. The batches here are built so the two differ by a lot.
"""

import math

import pytest
import torch

from ftune.data.mask import IGNORE_INDEX
from ftune.eval.loss import evaluate_loss

VOCAB = 64
PAD = 0


def batch(rows: list[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
    """A right-padded batch; each row is (token ids, how many leading tokens are prompt, i.e. not learned)."""
    length = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), length), PAD)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX)
    for i, (ids, prompt) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
        labels[i, prompt : len(ids)] = torch.tensor(ids[prompt:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


BATCHES = [
    # 1 learned token after the shift (prompt of 5, 6 tokens).
    batch([([3, 9, 27, 17, 44, 8], 5)]),
    # 2 rows, 7 + 3 learned tokens, one of them padded.
    batch([([5, 6, 7, 8, 9, 10, 11, 12], 1), ([40, 41, 42, 43, 44], 2)]),
    # 4 learned tokens.
    batch([([60, 2, 33, 14, 15], 1)]),
]


def hand_token_losses(model, batches) -> list[list[float]]:
    """Per batch, the cross-entropy of every learned token, one forward per row with no padding at all."""
    per_batch = []
    for b in batches:
        losses = []
        for row_ids, row_mask, row_labels in zip(b["input_ids"], b["attention_mask"], b["labels"], strict=True):
            ids = row_ids[row_mask.bool()]
            with torch.no_grad():
                log_probs = torch.log_softmax(model(ids[None]).logits[0].double(), dim=-1)
            for position in range(1, len(ids)):  # the token at `position` is predicted from position - 1
                label = int(row_labels[position])
                if label != IGNORE_INDEX:
                    losses.append(-float(log_probs[position - 1, label]))
        per_batch.append(losses)
    return per_batch


def test_loss_is_the_token_mean_over_all_batches_not_a_mean_of_batch_means(random_llama):
    model = random_llama(vocab_size=VOCAB)
    per_batch = hand_token_losses(model, BATCHES)
    assert [len(losses) for losses in per_batch] == [1, 10, 4]
    tokens = [loss for losses in per_batch for loss in losses]
    token_mean = sum(tokens) / len(tokens)
    mean_of_batch_means = sum(sum(losses) / len(losses) for losses in per_batch) / len(per_batch)
    # The batches tell the two apart (0.03 here) by far more than the tolerance below (4e-5).
    assert abs(token_mean - mean_of_batch_means) > 1e-2

    result = evaluate_loss(model, BATCHES)
    assert result["tokens"] == 15
    assert result["loss"] == pytest.approx(token_mean, rel=1e-5)
    assert result["ppl"] == pytest.approx(math.exp(token_mean), rel=1e-5)


@pytest.mark.parametrize("max_batches", [1, 2])
def test_max_batches_limits_the_batches_used(random_llama, max_batches):
    """`trainer.eval_batches` reaches evaluate_loss as `max_batches`: only the first that many batches count."""
    model = random_llama(vocab_size=VOCAB)
    tokens = [loss for losses in hand_token_losses(model, BATCHES[:max_batches]) for loss in losses]
    result = evaluate_loss(model, BATCHES, max_batches=max_batches)
    assert result["tokens"] == len(tokens) == [1, 11][max_batches - 1]
    assert result["loss"] == pytest.approx(sum(tokens) / len(tokens), rel=1e-5)


def test_max_batches_minus_one_or_beyond_the_loader_uses_all(random_llama):
    model = random_llama(vocab_size=VOCAB)
    everything = evaluate_loss(model, BATCHES, max_batches=-1)
    assert everything["tokens"] == 15
    assert evaluate_loss(model, BATCHES, max_batches=10) == everything


def test_training_mode_is_restored(random_llama):
    model = random_llama(vocab_size=VOCAB)
    model.train()
    evaluate_loss(model, BATCHES[:1])
    assert model.training
    model.eval()
    evaluate_loss(model, BATCHES[:1])
    assert not model.training
