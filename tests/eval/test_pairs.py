"""Held-out preference pairs in `ftune eval` (`ftune.eval.pairs`): which data holds pairs, their scores, metrics.

Each pair's summed log-probabilities are checked against a direct computation with training's
`unfused_sequence_logps` (a tiny random Llama on the shipped pairs, and the embedded model); the metrics of a row
on literal log-probabilities.
"""

import json
import math

import pytest
import torch

from ftune.config.schema import DataCfg, ModelCfg
from ftune.data.mask import IGNORE_INDEX
from ftune.data.preference import PAIRED_FORMATS, build_preference_split
from ftune.errors import DataError
from ftune.eval.loss import unfused_sequence_logps
from ftune.eval.pairs import holds_pairs, pair_logps, pair_metrics, reward_accuracy
from ftune.model.load import load_tokenizer

PAIR = {"prompt": [{"role": "user", "content": "Put it in the past: I walk."}],
        "chosen": [{"role": "assistant", "content": "I walked."}],
        "rejected": [{"role": "assistant", "content": "I walks."}]}


@pytest.fixture(scope="module")
def assets(tiny_model_path):
    return tiny_model_path.parents[1] / "data"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_path):
    return load_tokenizer(ModelCfg(name_or_path=str(tiny_model_path)), "model")


def held_out(path, **settings) -> DataCfg:
    return DataCfg(path=str(path), eval_path=str(path), num_proc=1, **settings)


def write_lines(path, records: list) -> str:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return str(path)


# --- holds_pairs ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "expected"), [
    ("pairs/validation.jsonl", True),
    ("chat/validation.jsonl", False),
    ("probe/general.jsonl", False),
])
def test_shipped_data_holds_pairs_only_where_its_first_record_is_a_pair(assets, source, expected):
    assert holds_pairs(held_out(assets / source)) is expected


def test_kto_rows_are_refused_as_held_out_data_detected_or_named(assets):
    path = assets / "pairs" / "kto_validation.jsonl"
    for cfg in (held_out(path), held_out(path, format="unpaired_preference")):
        with pytest.raises(DataError) as raised:
            holds_pairs(cfg)
        assert raised.value.message == (f"data.eval_path={path}: unpaired preference rows (prompt, completion, "
                                        "label: KTO's data), which ftune eval does not score (expected conversations "
                                        "or preference pairs)")


def test_whole_conversations_chosen_and_rejected_are_pairs_too(tmp_path):
    implicit = {"chosen": PAIR["prompt"] + PAIR["chosen"], "rejected": PAIR["prompt"] + PAIR["rejected"]}
    assert holds_pairs(held_out(write_lines(tmp_path / "implicit.jsonl", [implicit])))


def test_pairs_under_other_column_names_are_pairs_once_mapped(tmp_path):
    path = write_lines(tmp_path / "renamed.jsonl", [{"question": PAIR["prompt"], "good": PAIR["chosen"],
                                                     "bad": PAIR["rejected"]}])
    with pytest.raises(DataError, match="cannot tell the format"):
        holds_pairs(held_out(path))
    assert holds_pairs(held_out(path, columns={"prompt": "question", "chosen": "good", "rejected": "bad"}))


@pytest.mark.parametrize(("fmt", "expected"), [("preference", True), ("implicit_preference", True),
                                               ("messages", False), ("text", False)])
def test_a_format_set_in_the_config_is_taken_without_reading(tmp_path, fmt, expected):
    assert holds_pairs(held_out(tmp_path / "never-read.jsonl", format=fmt)) is expected


# --- pair_logps -------------------------------------------------------------------------------------------------


def direct_logps(model, tokenizer, cfg: DataCfg) -> torch.Tensor:
    """`[pairs, 2]` by hand: each response after its prompt, unpadded, through `unfused_sequence_logps`."""
    rows, _ = build_preference_split(cfg, tokenizer, split="eval", formats=PAIRED_FORMATS)
    scores = []
    for row in rows:
        prompt = list(row["prompt_ids"])
        pair = []
        for response in (list(row["chosen_ids"]), list(row["rejected_ids"])):
            ids = torch.tensor([prompt + response])
            labels = torch.tensor([[IGNORE_INDEX] * len(prompt) + response])
            with torch.no_grad():
                pair.append(unfused_sequence_logps(model(input_ids=ids).logits, labels)[0])
        scores.append(torch.stack(pair))
    return torch.stack(scores)


@pytest.fixture(scope="module")
def shipped_pairs(assets, tokenizer) -> DataCfg:
    cfg = held_out(assets / "pairs" / "validation.jsonl")
    rows, stats = build_preference_split(cfg, tokenizer, split="eval", formats=PAIRED_FORMATS)
    assert len(rows) == stats.read == 64  # every shipped held-out pair is scored
    return cfg


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_pair_logps_are_the_direct_sums_in_file_order_whatever_the_batch(random_llama, tokenizer, shipped_pairs,
                                                                         batch_size):
    model = random_llama(vocab_size=len(tokenizer)).eval()
    scores = pair_logps(model, tokenizer, shipped_pairs, batch_size)
    assert scores.shape == (64, 2) and scores.dtype == torch.float32 and scores.device.type == "cpu"
    torch.testing.assert_close(scores, direct_logps(model, tokenizer, shipped_pairs), rtol=1e-5, atol=1e-4)


def test_a_pairs_log_probability_is_the_sum_over_its_response_tokens_only(random_llama, tokenizer, tmp_path):
    cfg = held_out(write_lines(tmp_path / "one.jsonl", [PAIR]))
    model = random_llama(vocab_size=len(tokenizer)).eval()
    (row,), _ = build_preference_split(cfg, tokenizer, split="eval", formats=PAIRED_FORMATS)
    expected = []
    for response in (row["chosen_ids"], row["rejected_ids"]):
        ids = [*row["prompt_ids"], *response]
        with torch.no_grad():
            log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
        start = len(row["prompt_ids"])  # the first response token is predicted from the prompt's last position
        expected.append(sum(float(log_probs[position - 1, ids[position]]) for position in range(start, len(ids))))
    scores = pair_logps(model, tokenizer, cfg, 4)
    assert scores.shape == (1, 2)
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-5)


def test_the_embedded_model_prefers_the_right_tense_on_the_shipped_pairs(tiny_model_path, tokenizer, assets,
                                                                         tmp_path):
    from transformers import AutoModelForCausalLM

    first = (assets / "pairs" / "validation.jsonl").read_text().splitlines()[:6]
    cfg = held_out(write_lines(tmp_path / "six.jsonl", [json.loads(line) for line in first]))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    scores = pair_logps(model, tokenizer, cfg, 4)
    torch.testing.assert_close(scores, direct_logps(model, tokenizer, cfg), rtol=1e-5, atol=1e-4)
    assert pair_metrics(scores)["pair_accuracy"] == 1.0 and bool((scores < 0).all())


def test_held_out_data_with_no_pair_left_fails_naming_the_file(random_llama, tokenizer, tmp_path):
    path = write_lines(tmp_path / "same.jsonl", [PAIR | {"rejected": PAIR["chosen"]}])
    with pytest.raises(DataError, match="no pair left to train on"):
        pair_logps(random_llama(vocab_size=len(tokenizer)), tokenizer, held_out(path), 4)


# --- pair_metrics and reward_accuracy ---------------------------------------------------------------------------


@pytest.mark.parametrize(("logps", "accuracy", "margin"), [
    ([[-1.0, -2.0]], 1.0, 1.0),
    ([[-2.0, -1.0]], 0.0, -1.0),
    ([[-2.0, -2.0]], 0.0, 0.0),  # a tie is no preference
    ([[-1.0, -3.0], [-4.0, -1.0], [-5.0, -5.0], [-0.5, -1.0]], 0.5, (2.0 - 3.0 + 0.0 + 0.5) / 4),
])
def test_pair_metrics_count_outright_preferences_and_average_the_margin(logps, accuracy, margin):
    metrics = pair_metrics(torch.tensor(logps))
    assert metrics == {"pair_accuracy": accuracy, "pair_margin": margin, "pairs": len(logps)}
    assert isinstance(metrics["pairs"], int)


def test_a_nan_log_probability_counts_as_no_preference_and_shows_in_the_margin():
    metrics = pair_metrics(torch.tensor([[-1.0, -2.0], [math.nan, -2.0]]))
    assert metrics["pair_accuracy"] == 0.5 and math.isnan(metrics["pair_margin"]) and metrics["pairs"] == 2


@pytest.mark.parametrize(("logps", "reference", "expected"), [
    ([[-1.0, -2.0]], [[-1.0, -2.0]], 0.0),  # the reference itself: nothing gained, as a DPO run at step 0
    ([[-1.0, -5.0]], [[-2.0, -2.0]], 1.0),  # chosen up, rejected down
    ([[-3.0, -4.0]], [[-1.0, -3.0]], 0.0),  # both down, the chosen more: chosen still preferred, no reward
    ([[-5.0, -4.0]], [[-6.0, -9.0]], 0.0),  # both up, the rejected more: no reward
    ([[-2.0, -4.0], [-2.0, -2.0], [-1.0, -1.5], [-3.0, -1.0]], [[-2.0, -3.0], [-3.0, -1.0], [-1.0, -1.0],
                                                               [-3.0, -2.0]], 0.75),
])
def test_reward_accuracy_compares_what_each_response_gained_over_the_reference(logps, reference, expected):
    assert reward_accuracy(torch.tensor(logps), torch.tensor(reference)) == expected
