"""The loop's gradient is the mean over every learned token of the optimizer step, however it is split."""

from types import SimpleNamespace

import torch
from accelerate import Accelerator

from ftune.config.schema import RunCfg, TrainerCfg
from ftune.data.collate import PadCollator
from ftune.data.mask import IGNORE_INDEX
from ftune.train.loop import due, forward_backward, to_host
from ftune.train.objectives import build_objective
from ftune.train.state import TrainState


def ragged_examples(n: int, vocab: int, seed: int = 0) -> list[dict]:
    """Examples of very different lengths whose first half is a prompt (ignored) and the rest learned."""
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i in range(n):
        length = 4 + 5 * i  # 4 .. 39 tokens: per-micro-batch averaging would weigh these very differently
        ids = torch.randint(1, vocab, (length,), generator=gen).tolist()
        labels = [IGNORE_INDEX] * (length // 2) + ids[length // 2:]
        examples.append({"input_ids": ids, "labels": labels})
    return examples


def step_gradient(model, examples: list[dict], micro_batch: int, penalties=()) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    collate = PadCollator(pad_token_id=0, pad_to_multiple_of=1)
    batches = [collate(examples[i:i + micro_batch]) for i in range(0, len(examples), micro_batch)]
    objective = build_objective(RunCfg(trainer=TrainerCfg(loss_chunk_size=5)))  # chunks split micro-batches unevenly
    objective.attach(model, tokenizer=None)
    run = SimpleNamespace(accelerator=Accelerator(cpu=True), model=model, objective=objective, state=TrainState(),
                          penalties=list(penalties))
    forward_backward(run, batches)
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def test_micro_batch_2_x_accum_4_equals_batch_8(random_llama):
    model = random_llama()
    examples = ragged_examples(8, vocab=64)
    whole = step_gradient(model, examples, micro_batch=8)
    split = step_gradient(model, examples, micro_batch=2)
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_penalty_enters_the_step_gradient_once_however_the_step_is_split(random_llama):
    """Its gradient, 2 W F (theta - theta*), adds to the loss's once for 1 x 8 and for 4 x 2 micro-batches."""
    from ftune.train.ewc import ElasticPenalty

    model = random_llama()
    examples = ragged_examples(8, vocab=64)
    fisher = {name: torch.rand_like(param) for name, param in model.named_parameters()}
    penalty = ElasticPenalty(model, fisher, weight=2.0)  # anchored at the weights as they are now
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01)
    for micro_batch in (8, 2):
        without = step_gradient(model, examples, micro_batch)
        with_penalty = step_gradient(model, examples, micro_batch, penalties=[penalty])
        for name, grad in without.items():
            torch.testing.assert_close(with_penalty[name] - grad, 2 * 2.0 * fisher[name] * 0.01, rtol=1e-3,
                                       atol=1e-6, msg=name)


def test_step_gradient_equals_mean_token_loss_gradient(random_llama):
    """The accumulated gradient is that of the plain mean cross-entropy over all learned tokens."""
    model = random_llama()
    examples = ragged_examples(6, vocab=64, seed=1)
    accumulated = step_gradient(model, examples, micro_batch=2)
    model.zero_grad(set_to_none=True)
    loss = torch.stack([
        torch.nn.functional.cross_entropy(
            model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1], torch.tensor(e["labels"][1:]),
            ignore_index=IGNORE_INDEX, reduction="sum",
        )
        for e in examples
    ]).sum() / sum(sum(label != IGNORE_INDEX for label in e["labels"][1:]) for e in examples)
    loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(accumulated[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_due():
    assert [s for s in range(1, 11) if due(s, 4)] == [4, 8]
    assert not any(due(s, 0) for s in range(1, 11))


def test_step_figures_come_back_exact_in_one_read():
    """Loss sums, token counts (exact as float64) and the gradient norm (a tensor, a float, or None)."""
    figures = to_host({"loss": torch.tensor(2.5), "learned": torch.tensor(2**40 + 1), "tokens": torch.tensor(9),
                       "grad_norm": 1.5, "unknown": None})
    assert figures == {"loss": 2.5, "learned": 2**40 + 1, "tokens": 9, "grad_norm": 1.5, "unknown": figures["unknown"]}
    assert figures["unknown"] != figures["unknown"]  # NaN
