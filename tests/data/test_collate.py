import torch

from ftune.config.schema import DataCfg
from ftune.data.collate import PadCollator, build_collator, pad_multiple, shared_prompt_rows


def test_pad_collator_pads_right_with_ignored_labels_and_rounds_width():
    batch = PadCollator(pad_token_id=0, pad_to_multiple_of=4)(
        [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["num_tokens"].item() == 4
    assert all(t.dtype == torch.long for t in batch.values())


def test_pad_collator_without_rounding_uses_the_longest_example():
    batch = PadCollator(pad_token_id=9)([{"input_ids": [1, 2], "labels": [1, 2]}])
    assert batch["input_ids"].tolist() == [[1, 2]]


def test_padding_rounds_to_8_only_where_training_runs_on_a_gpu(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pad_multiple(0) == 1  # a CPU computes every pad slot for nothing
    collate = build_collator(DataCfg(), pad_token_id=0, attn_implementation="sdpa")
    assert collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}])["input_ids"].shape == (1, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pad_multiple(0) == 8
    assert build_collator(DataCfg(packing=True), 0, "sdpa").pad_to_multiple_of == 8
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # a GPU machine told to train on its CPU
    assert pad_multiple(0) == 1
    assert pad_multiple(16) == 16  # a configured multiple is kept everywhere


def test_a_prompts_responses_each_follow_it_once_in_its_row_seeing_the_prompt_and_themselves():
    """GRPO's groups: any number of responses per prompt; an empty one takes no place; padding sees itself only."""
    batch = shared_prompt_rows([[5, 6], [4]], [[[7, 8], [], [9]], [[3], [2, 1], [6]]], [[0, 1, 2], [3, 4, 5]],
                               pad_token_id=0, multiple=3, attn_implementation="sdpa")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0], [4, 3, 2, 1, 6, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0], [0, 1, 1, 2, 1, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 9, -100], [-100, 3, 2, 1, 6, -100]]
    assert batch["logp_source"].tolist() == [1, 2, 1, 6, 6, 8, 6]  # each first token from the prompt's last place
    assert batch["logp_target"].tolist() == [7, 8, 9, 3, 2, 1, 6]
    assert batch["logp_slot"].tolist() == [0, 0, 2, 3, 4, 4, 5]
    assert batch["logp_offset"].tolist() == [0, 1, 0, 0, 0, 1, 0]
    assert batch["num_tokens"].item() == 10
    assert batch["attention_mask"][0, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                                            [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                                                            [1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert batch["attention_mask"][1, 0].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0],
                                                            [1, 0, 1, 0, 0, 0], [1, 0, 1, 1, 0, 0],
                                                            [1, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
