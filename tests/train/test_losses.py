"""Losses against hand computations on literal logits: distillation terms, masking, prompt-tuning alignment."""

import math

import pytest
import torch

from ftune.config.schema import DistillCfg, TrainerCfg
from ftune.data.mask import IGNORE_INDEX as X
from ftune.eval.loss import cross_entropy_sum
from ftune.train.losses import build_step_loss, distillation_sums

# One row of 4 positions over a vocabulary of 3. After the shift, positions 0 and 2 predict the learned
# labels 1 and 2; position 1 predicts an ignored label and position 3 predicts nothing.
STUDENT = [[1.0, 2.0, 0.5], [9.0, -9.0, 9.0], [0.0, -1.0, 1.5], [5.0, 5.0, -5.0]]
TEACHER = [[0.5, 3.0, 0.0], [-9.0, 9.0, 0.0], [1.0, 0.0, 2.5], [-5.0, 0.0, 5.0]]
LABELS = [X, 1, X, 2]
LEARNED = [(0, 1), (2, 2)]  # (position, its target)


def log_softmax(row: list[float], temperature: float = 1.0) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    norm = top + math.log(sum(math.exp(v - top) for v in scaled))
    return [v - norm for v in scaled]


def hand_terms(temperature: float) -> tuple[float, float]:
    """(CE sum, KL(teacher || student) sum at `temperature`) over the learned positions, in plain Python."""
    ce = sum(-log_softmax(STUDENT[pos])[target] for pos, target in LEARNED)
    kl = 0.0
    for pos, _ in LEARNED:
        log_t, log_s = log_softmax(TEACHER[pos], temperature), log_softmax(STUDENT[pos], temperature)
        kl += sum(math.exp(lt) * (lt - ls) for lt, ls in zip(log_t, log_s, strict=True))
    return ce, kl


def terms(student=STUDENT, teacher=TEACHER, alpha=0.3, temperature=2.0) -> dict[str, float]:
    out = distillation_sums(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([LABELS]),
                            DistillCfg(teacher="t", alpha=alpha, temperature=temperature))
    return {k: v.item() for k, v in out.items()}


@pytest.mark.parametrize("alpha,temperature", [(0.3, 2.0), (0.5, 1.0), (0.9, 4.0)])
def test_distillation_matches_hand_computation(alpha, temperature):
    ce, kl = hand_terms(temperature)
    got = terms(alpha=alpha, temperature=temperature)
    assert got["ce_loss"] == pytest.approx(ce, rel=1e-5)
    assert got["kd_loss"] == pytest.approx(temperature**2 * kl, rel=1e-5)  # the T^2 factor
    assert got["loss"] == pytest.approx(alpha * ce + (1 - alpha) * temperature**2 * kl, rel=1e-5)


def test_alpha_extremes_select_one_term():
    ce, kl = hand_terms(2.0)
    assert terms(alpha=1.0)["loss"] == pytest.approx(ce, rel=1e-5)
    assert terms(alpha=0.0)["loss"] == pytest.approx(4.0 * kl, rel=1e-5)


def test_masked_positions_contribute_nothing():
    # Rewrite the logits of every position whose (shifted) label is ignored or absent, in both models.
    student = [STUDENT[0], [-50.0, 50.0, 0.0], STUDENT[2], [0.0, 0.0, 80.0]]
    teacher = [TEACHER[0], [50.0, 0.0, -50.0], TEACHER[2], [80.0, 0.0, 0.0]]
    assert terms(student, teacher) == pytest.approx(terms())


def test_same_distributions_have_no_kd_loss():
    assert terms(teacher=STUDENT)["kd_loss"] == pytest.approx(0.0, abs=1e-6)


def test_prompt_tuning_logits_are_aligned_to_the_labels():
    # Prompt tuning prepends 2 virtual tokens: their logits come first and must be ignored.
    virtual = [[100.0, -100.0, 0.0], [-100.0, 100.0, 0.0]]
    plain = cross_entropy_sum(torch.tensor([STUDENT]), torch.tensor([LABELS]))
    prompted = cross_entropy_sum(torch.tensor([virtual + STUDENT]), torch.tensor([LABELS]))
    assert prompted.item() == pytest.approx(plain.item())
    assert plain.item() == pytest.approx(hand_terms(1.0)[0], rel=1e-5)
    kd = distillation_sums(torch.tensor([virtual + STUDENT]), torch.tensor([TEACHER]), torch.tensor([LABELS]),
                           DistillCfg(teacher="t", alpha=0.3, temperature=2.0))
    assert {k: v.item() for k, v in kd.items()} == pytest.approx(terms())


def test_step_loss_runs_the_teacher_without_a_graph(random_llama):
    student, teacher = random_llama(seed=0), random_llama(seed=1)
    ids = torch.randint(1, 64, (2, 6))
    labels = ids.clone()
    labels[:, :2] = X
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    distill = build_step_loss(student, TrainerCfg(), teacher.requires_grad_(False), DistillCfg(teacher="t", alpha=0.5))
    parts = distill(student, data)
    assert set(parts) == {"loss", "ce_loss", "kd_loss"}
    parts["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    plain = distill.without_teacher()(student, data)
    assert set(plain) == {"loss"} and plain["loss"].item() == pytest.approx(parts["ce_loss"].item(), rel=1e-5)
