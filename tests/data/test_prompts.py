"""GRPO's prompts files: rendered up to the answer, columns kept for the rewards, bad records named in one line."""

import pytest

from ftune.config.schema import DataCfg
from ftune.data.prompts import TOO_LONG, build_prompt_rows, collate_prompts
from ftune.data.templates import render
from ftune.errors import DataError


@pytest.fixture
def tokenizer(make_tokenizer):
    return make_tokenizer("chatml")


def write(tmp_path, *lines: str):
    path = tmp_path / "prompts.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_a_conversation_is_rendered_up_to_the_assistant_turn_and_its_columns_kept(tmp_path, tokenizer):
    from ftune.data.templates import resolve_template

    template = resolve_template("chatml", tokenizer)
    path = write(tmp_path, '{"prompt": [{"role": "user", "content": "hi there"}], "answer": "5"}',
                 '{"prompt": "plain text", "answer": "6", "extra": 1}')
    rows, stats = build_prompt_rows(path, tokenizer, template, DataCfg(max_length=256), room=16)
    rendered = render(template, [{"role": "user", "content": "hi there"}], tokenizer, add_generation_prompt=True)
    assert rows[0].prompt_ids == tokenizer.encode(rendered, add_special_tokens=False)
    assert rows[1].prompt_ids == tokenizer.encode("plain text")
    assert stats.kept == 2 and not stats.dropped
    batch = collate_prompts(rows)
    assert batch["columns"] == {"answer": ["5", "6"], "extra": [None, 1]}
    assert batch["prompts"] == [[{"role": "user", "content": "hi there"}], "plain text"]


def test_a_prompt_without_room_for_its_completion_is_dropped_and_counted(tmp_path, tokenizer):
    from ftune.data.templates import resolve_template

    template = resolve_template("chatml", tokenizer)
    path = write(tmp_path, '{"prompt": "short"}', '{"prompt": "' + "word " * 40 + '"}')
    rows, stats = build_prompt_rows(path, tokenizer, template, DataCfg(max_length=24), room=16)
    assert len(rows) == 1 and stats.dropped == {TOO_LONG: 1}
    with pytest.raises(DataError, match="no prompt of at most 0 tokens"):
        build_prompt_rows(path, tokenizer, template, DataCfg(max_length=16), room=16)


@pytest.mark.parametrize("line, said", [
    ('{"question": "hi"}', r"prompts.jsonl:2: expected an object with a 'prompt'"),
    ('{"prompt": [{"role": "assistant", "content": "hi"}]}', r"prompts.jsonl:2: prompt: ends with an assistant turn"),
    ('{"prompt": ', r"prompts.jsonl:2"),
])
def test_a_bad_record_names_its_file_and_line(tmp_path, tokenizer, line, said):
    from ftune.data.templates import resolve_template

    path = write(tmp_path, '{"prompt": "fine"}', line)
    with pytest.raises(DataError, match=said):
        build_prompt_rows(path, tokenizer, resolve_template("chatml", tokenizer), DataCfg(), room=16)


def test_data_columns_names_the_prompt_column(tmp_path, tokenizer):
    from ftune.data.templates import resolve_template

    path = write(tmp_path, '{"question": "2 + 3 = ?", "answer": "#### 5"}')
    cfg = DataCfg(columns={"prompt": "question"})
    rows, _ = build_prompt_rows(path, tokenizer, resolve_template("chatml", tokenizer), cfg, room=16)
    assert rows[0].prompt == "2 + 3 = ?" and rows[0].columns == {"answer": "#### 5"}
