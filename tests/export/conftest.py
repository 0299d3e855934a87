"""Runs to export: the shipped tiny recipes cut to a couple of steps (one evaluation at the end)."""

import pytest

from ftune.cli import main

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say walked in the present."},
                {"role": "assistant", "content": "walk"}, {"role": "user", "content": "And ran?"},
                {"role": "assistant", "content": "run"}]
"""Two turns, as a user's chat data has them (a different conversation from the export's own probe)."""


def train(run_dir, recipe: str) -> None:
    """`ftune train recipe=<recipe>` for 2 steps on the embedded model, evaluated once on one batch."""
    assert main(["train", f"recipe={recipe}", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_batches=1",
                 f"output_dir={run_dir}"]) == 0


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny_lora"
    train(run_dir, "tiny_lora")
    return run_dir


@pytest.fixture(scope="session")
def qlora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny_qlora"
    train(run_dir, "tiny_qlora")
    return run_dir


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
