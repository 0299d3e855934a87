"""The chunked loss equals the unfused one: loss and every gradient, for every kind of head, in fp32.

"Equal" is `close`: each tensor within 1e-5 of the reference's largest magnitude (relative, fp32). The
chunk size (5 tokens) never divides the rows evenly, so partial chunks are always exercised.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PromptTuningConfig, get_peft_model

from ftune.config.schema import DistillCfg, TrainerCfg
from ftune.data.mask import IGNORE_INDEX as X
from ftune.train.chunked import ChunkSpec, LinearHead, chunked_loss
from ftune.train.losses import UNFUSED, build_step_loss, distillation_sums

RELATIVE = 1e-5
CHUNK = 5
VOCAB = 64
"""The tokenizer's vocabulary; models built with more embedding rows have padded ones."""


def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= RELATIVE * max(scale, 1e-12), what


def llama(rows: int = VOCAB, tied: bool = False, seed: int = 0):
    """A random 2-layer Llama (hidden 16) with `rows` embedding rows, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128, pad_token_id=0,
                         tie_word_embeddings=tied)
    return LlamaForCausalLM(config).float()


def batch(seed: int = 0) -> dict:
    """Two rows of 9 tokens: a prompt (ignored), learned tokens, and padding at the end of the second."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0
    labels = ids.clone()
    labels[:, :3] = X
    labels[1, 7:] = X
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def gradients(model, loss_fn, data: dict) -> tuple[dict, dict]:
    """The loss terms and the trainable parameters' gradients after one backward (by name)."""
    model.zero_grad(set_to_none=True)
    parts = loss_fn(model, data)
    (parts["loss"] * 0.37).backward()  # a scale other than 1 reaches the stored gradients
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach() for k, v in parts.items()}, grads


def assert_same(model, chunked, reference, data: dict) -> None:
    got_parts, got = gradients(model, chunked, data)
    want_parts, want = gradients(model, reference, data)
    assert set(got_parts) == set(want_parts)
    for key in want_parts:
        close(got_parts[key], want_parts[key], key)
    assert set(got) == set(want) and got
    for name in want:
        assert want[name].abs().max() > 0, f"{name}: the test would not see a wrong gradient"
        close(got[name], want[name], name)


def lora_head(model, **extra):
    """LoRA on q_proj and the output head, with random (not zero) B so the head's adapter term counts."""
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "lm_head"],
                        init_lora_weights=False, **extra)
    return get_peft_model(model, config)


MODELS = {
    "plain": lambda: llama(),
    "tied": lambda: llama(tied=True),
    "padded_rows": lambda: llama(rows=VOCAB + 8),
    "lora_on_head": lambda: lora_head(llama()),
    "lora_on_tied_head": lambda: lora_head(llama(tied=True)),
    "modules_to_save": lambda: get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj"],
                                                                  modules_to_save=["lm_head"],
                                                                  init_lora_weights=False)),
    "prompt_tuning": lambda: get_peft_model(llama(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)),
}


@pytest.mark.parametrize("recompute", [False, True], ids=["precomputed", "recompute"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_cross_entropy_and_gradients_equal_the_unfused_loss(kind, recompute):
    model = MODELS[kind]()
    chunked = build_step_loss(model, TrainerCfg(loss_chunk_size=CHUNK, loss_recompute=recompute))
    assert chunked.head is not None  # the chunked path was taken
    assert_same(model, chunked, UNFUSED, batch())


@pytest.mark.parametrize("recompute", [False, True], ids=["precomputed", "recompute"])
@pytest.mark.parametrize("student_rows,teacher_rows", [(VOCAB, VOCAB), (VOCAB + 8, VOCAB + 24)])
def test_distillation_and_gradients_equal_the_unfused_loss(student_rows, teacher_rows, recompute):
    """Padded heads of different sizes (Qwen: 151,665 tokens in 152,064 rows) compare the shared vocabulary."""
    student, teacher = lora_head(llama(rows=student_rows)), llama(rows=teacher_rows, seed=1).requires_grad_(False)
    distill = DistillCfg(teacher="t", alpha=0.3, temperature=2.0)
    trainer = TrainerCfg(loss_chunk_size=CHUNK, loss_recompute=recompute)
    chunked = build_step_loss(student, trainer, teacher, distill, vocab=VOCAB)
    unfused = build_step_loss(student, dataclasses.replace(trainer, loss_chunk_size=0), teacher, distill, VOCAB)
    assert chunked.head is not None and unfused.head is None
    assert_same(student, chunked, unfused, batch(seed=1))
    assert all(p.grad is None for p in teacher.parameters())


def test_padded_teacher_rows_do_not_enter_the_kl():
    """Rows past the tokenizer's vocabulary are padding: huge teacher logits there must change nothing."""
    student, labels = torch.randn(1, 4, VOCAB + 2), torch.tensor([[X, 1, 2, 3]])
    teacher = torch.randn(1, 4, VOCAB + 6)
    spiked = teacher.clone()
    spiked[..., VOCAB:] = 50.0
    cfg = DistillCfg(teacher="t", alpha=0.5, temperature=2.0)
    assert distillation_sums(student, spiked, labels, cfg, VOCAB)["kd_loss"].item() == pytest.approx(
        distillation_sums(student, teacher, labels, cfg, VOCAB)["kd_loss"].item())


@pytest.mark.parametrize("recompute", [False, True], ids=["precomputed", "recompute"])
def test_ignored_rows_are_masked_when_not_removed(recompute):
    """On accelerators every row goes through the head (no host sync to select them): ignored ones count 0."""
    torch.manual_seed(0)
    hidden = torch.randn(13, 8, requires_grad=True)
    weight, bias = torch.randn(VOCAB, 8, requires_grad=True), torch.randn(VOCAB, requires_grad=True)
    targets = torch.randint(0, VOCAB, (13,))
    targets[::3] = X
    got = chunked_loss(LinearHead((hidden,), (weight,), bias), targets, ChunkSpec(CHUNK, recompute))["loss"]
    got_grads = torch.autograd.grad(got, [hidden, weight, bias])
    want = F.cross_entropy(hidden @ weight.T + bias, targets, ignore_index=X, reduction="sum")
    close(got.detach(), want.detach(), "loss")
    for name, g, w in zip(("hidden", "weight", "bias"), got_grads, torch.autograd.grad(want, [hidden, weight, bias]),
                          strict=True):
        close(g, w, name)


def test_no_gradient_work_without_grad():
    """Under no_grad (evaluation) the precomputed variant computes no gradient buffers."""
    hidden, weight = torch.randn(6, 8, requires_grad=True), torch.randn(VOCAB, 8, requires_grad=True)
    with torch.no_grad():
        loss = chunked_loss(LinearHead((hidden,), (weight,)), torch.arange(6), ChunkSpec(CHUNK))["loss"]
    assert not loss.requires_grad and loss.grad_fn is None


def test_bf16_autocast_matches_the_unfused_loss_within_bf16_rounding():
    """Under mixed precision the head's matmuls run in bf16 as autocast's would: same loss to bf16 precision."""
    model = llama(rows=VOCAB + 8)
    chunked = build_step_loss(model, TrainerCfg(loss_chunk_size=CHUNK, mixed_precision="bf16"))
    data = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # what accelerate wraps the model's forward in
        want = UNFUSED(model, data)["loss"]
    got = chunked(model, data)["loss"]  # the loss itself runs outside autocast, as in the loop
    assert got.item() == pytest.approx(want.item(), rel=2e-3)


def test_unsupported_heads_fall_back_to_full_logits():
    model = get_peft_model(llama(), LoraConfig(r=4, target_modules=["q_proj", "lm_head"], use_dora=True))
    assert build_step_loss(model, TrainerCfg()).head is None
    assert build_step_loss(llama(), TrainerCfg(loss_chunk_size=0)).head is None
