"""The items of the tinyworld_tense task, read from the JSONL file next to this module (no download)."""

import json
from pathlib import Path

ITEMS = Path(__file__).with_name("test.jsonl")


def load_items(**metadata):
    """lm-eval's `custom_dataset` hook: the task's one split, as a `datasets.DatasetDict` (metadata is unused)."""
    import datasets

    records = [json.loads(line) for line in ITEMS.read_text().splitlines()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})
