"""Generation metrics: exact match and SQuAD-style token F1 on literal texts, and what the model is prompted with."""

import warnings

import pytest
import torch

from ftune.eval import generation
from ftune.eval.generation import exact_match, split_last_answer, summarize, token_f1


@pytest.mark.parametrize(
    ("answer", "reference", "expected"),
    [
        ("the cat sat", "a cat sat down", 2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4)),
        ("The  Cat\nsat", "the cat sat", 1.0),  # lowercased, any whitespace splits
        ("cat cat", "cat", 2 * (1 / 2) * 1 / (1 / 2 + 1)),  # a repeated token counts once per occurrence
        ("dog", "cat", 0.0),
        ("", "", 1.0),
        ("", "cat", 0.0),
    ],
)
def test_token_f1(answer, reference, expected):
    assert token_f1(answer, reference) == pytest.approx(expected)


def test_exact_match_ignores_case_and_spacing_only():
    assert exact_match(" The cat  sat. ", "the cat sat.") == 1.0
    assert exact_match("the cat sat", "the cat sat.") == 0.0


def test_the_prompt_is_every_turn_before_the_last_answer():
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]
    prompt, reference = split_last_answer(messages)
    assert prompt == messages[:4] and reference == "a2"


def test_summary_averages_the_scores():
    from ftune.eval.generation import GenerationScore

    scores = [GenerationScore("a", "a", 1.0, 1.0, 3), GenerationScore("b", "c", 0.0, 0.0, 5)]
    assert summarize(scores) == {"exact_match": 0.5, "f1": 0.5, "answer_tokens": 4.0, "generated": 2}


SETTINGS = {"num_generations": 4, "max_new_tokens": 8, "temperature": 1.0, "top_p": 0.9, "stop_ids": [2],
            "pad_id": 3}
PROMPTS = [[405, 77, 312, 58, 96, 1020], [1133, 240], [290, 66, 819]]  # three widths: two prompts left-padded


def test_a_prompt_computed_once_for_its_group_samples_what_rows_of_their_own_sample(tiny_model_path, monkeypatch):
    """The shared prompt cache changes the work, not the result: the same completions at the same seed.

    On the embedded model, whose attention has learned to depend on positions (a random one's hardly does): a
    padded prompt's cache at other positions than `generate` continues from samples other tokens.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    ids, mask = generation.left_padded(PROMPTS, 3, model.device)
    cache = generation.shared_prompt_cache(model, ids, mask, 4)
    assert cache.get_seq_length() == ids.size(1) - 1  # every prompt token but the last, which `generate` computes
    assert cache.layers[0].keys.size(0) == 12  # 3 prompts x 4 completions
    torch.manual_seed(3)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the cache goes by the keyword this transformers expects
        shared = generation.sample_completions(model, PROMPTS, **SETTINGS)
    monkeypatch.setattr(generation, "shared_prompt_cache", lambda *args: None)
    torch.manual_seed(3)
    separate = generation.sample_completions(model, PROMPTS, **SETTINGS)
    assert torch.equal(shared.completion_ids, separate.completion_ids)
    assert torch.equal(shared.prompt_ids, separate.prompt_ids)
    assert torch.equal(shared.prompt_ids[4:8, -2:], torch.tensor([[1133, 240]] * 4))


def test_nothing_is_shared_for_a_prompt_learning_adapter_or_a_single_completion(random_llama):
    from peft import PromptTuningConfig, get_peft_model

    model = random_llama(vocab_size=2048).eval()
    ids, mask = generation.left_padded(PROMPTS, 0, model.device)
    assert generation.shared_prompt_cache(model, ids, mask, 1) is None
    prompted = get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert generation.shared_prompt_cache(prompted, ids, mask, 4) is None
