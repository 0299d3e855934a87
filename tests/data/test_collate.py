import torch

from ftune.data.collate import PadCollator


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
