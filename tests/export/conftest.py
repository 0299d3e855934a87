"""Runs to export: the shipped tiny recipes cut to 2 steps, one evaluation batch and a 16-document probe."""

import pytest

from ftune.cli import main

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say walked in the present."},
                {"role": "assistant", "content": "walk"}, {"role": "user", "content": "And ran?"},
                {"role": "assistant", "content": "run"}]
"""Two turns, as a user's chat data has them (a different conversation from the export's own probe)."""


@pytest.fixture(scope="session")
def train(tmp_path_factory, tiny_model_path):
    """`ftune train recipe=NAME` for 2 steps on the embedded model, evaluated once at the end.

    The evaluation gives the card its metrics and the forgetting probe's drift; it reads one batch and 16 probe
    documents, since a QLoRA forward is slow on CPU.
    """
    root = tmp_path_factory.mktemp("runs")
    probe = root / "probe.jsonl"
    lines = (tiny_model_path.parents[1] / "data" / "probe" / "general.jsonl").read_text().splitlines()
    probe.write_text("\n".join(lines[:16]) + "\n")

    def run(recipe: str):
        run_dir = root / recipe
        assert main(["train", f"recipe={recipe}", "trainer.max_steps=2", "trainer.eval_every=0",
                     "trainer.eval_batches=1", f"probe.path={probe}", f"output_dir={run_dir}"]) == 0
        return run_dir

    return run


@pytest.fixture(scope="session")
def lora_run(train):
    return train("tiny_lora")


@pytest.fixture(scope="session")
def qlora_run(train):
    return train("tiny_qlora")


@pytest.fixture(scope="session")
def conversation() -> list[dict]:
    return CONVERSATION


@pytest.fixture(scope="session")
def training_render(tiny_model_path):
    """What training rendered: the runs' template (`data.chat_template=tokenizer`, the base's own) on messages."""
    from transformers import AutoTokenizer

    from ftune.data.templates import render, resolve_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_path)
    return lambda messages, add_generation_prompt=False: render(resolve_template("tokenizer", tokenizer), messages,
                                                                tokenizer, add_generation_prompt)
