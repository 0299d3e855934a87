"""The chat template a run trained with travels with `final/` and its merge (issue 13, item 5)."""

import json
import shutil

from transformers import AutoTokenizer

from ftune.cli import main
from ftune.data.templates import render, resolve_template

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say walked in the present."},
                {"role": "assistant", "content": "walk"}, {"role": "user", "content": "And ran?"},
                {"role": "assistant", "content": "run"}]


def test_a_named_template_on_a_base_without_one_is_what_final_and_merged_render(tiny_model_path, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_model_path, base)
    (base / "chat_template.jinja").unlink()  # a base model with no chat template, as the 7B recipes' bases
    assert AutoTokenizer.from_pretrained(base).chat_template is None
    run_dir = tmp_path / "run"
    assert main(["train", "recipe=tiny_lora", "trainer.max_steps=1", "trainer.eval_every=0", "probe.path=null",
                 "data.chat_template=chatml", f"model.name_or_path={base}", f"output_dir={run_dir}"]) == 0
    trained = AutoTokenizer.from_pretrained(base)
    expected = render(resolve_template("chatml", trained), CONVERSATION, trained)
    eot = trained.convert_tokens_to_ids("<|im_end|>")  # also this tokenizer's EOS, so the only stop id
    assert trained.eos_token_id == eot

    merged = tmp_path / "merged"
    assert main(["merge", f"adapter={run_dir / 'final'}", f"out={merged}"]) == 0
    for artefact in (run_dir / "final", merged):
        assert AutoTokenizer.from_pretrained(artefact).apply_chat_template(CONVERSATION, tokenize=False) == expected
        assert json.loads((artefact / "generation_config.json").read_text())["eos_token_id"] in (eot, [eot])
