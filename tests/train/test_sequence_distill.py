"""Sequence-level distillation: the teacher's greedy or seeded answers, cached and reused, learned as SFT labels."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import AutoModelForCausalLM, AutoTokenizer

from ftune.cli import main
from ftune.config.compose import load_run_config
from ftune.data.pipeline import build_train_split
from ftune.errors import ConfigError, DataError
from ftune.model.load import load_tokenizer
from ftune.train.objectives import build_objective, sequence_distill
from ftune.train.objectives.sequence_distill import (
    resolve_teacher_responses,
    responses_path,
    write_teacher_responses,
)
from ftune.train.rundir import ResumeChanges, compare_with_checkpoint_config, write_run_config

CHAT = Path(__file__).resolve().parents[2] / "ftune" / "assets" / "data" / "chat" / "train.jsonl"
ANSWER_TOKENS = 8
"""The teacher's longest answer here: enough to see it continue the prompt, short enough to generate in seconds."""


@pytest.fixture(autouse=True)
def cold_cache(tmp_path, monkeypatch):
    """Each test generates into a cache of its own."""
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def prompts(tmp_path) -> Path:
    """Two conversations of the shipped chat data, the first with a system turn, the second without."""
    path = tmp_path / "prompts.jsonl"
    lines = CHAT.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    return path


def run_cfg(data: Path, *overrides: str):
    cfg, _ = load_run_config(["recipe=tiny_lora", "objective=distill", "distill.mode=sequence", f"data.path={data}",
                              "data.eval_path=null", f"distill.max_new_tokens={ANSWER_TOKENS}", *overrides])
    return cfg


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def direct_greedy(model_dir: Path, prompt: list[dict], end_of_turn: str) -> str:
    """The answer of transformers alone: the model's chat template, greedy `generate` to its end of turn or EOS."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False)])
    declared = model.generation_config.eos_token_id
    stops = [tokenizer.convert_tokens_to_ids(end_of_turn), *(declared if isinstance(declared, list) else [declared])]
    unused_rows = list(range(len(tokenizer), model.get_output_embeddings().weight.shape[0])) or None
    output = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=ANSWER_TOKENS,
                            do_sample=False, eos_token_id=stops, pad_token_id=stops[0], suppress_tokens=unused_rows)
    return tokenizer.decode(output[0, ids.size(1):], skip_special_tokens=True).split(end_of_turn)[0].strip()


@pytest.mark.parametrize("family,end_of_turn", [(None, "<|im_end|>"), ("llama3.1-8b-instruct", "<|eot_id|>")])
def test_the_student_learns_the_teachers_greedy_answers_in_its_own_tokens(family, end_of_turn, prompts, tiny_arch,
                                                                          tiny_model_path):
    teacher = tiny_arch(family) if family else tiny_model_path  # Llama 3's tokenizer and template: not the student's
    cfg = run_cfg(prompts, f"distill.teacher={teacher}")
    originals = read_jsonl(prompts)
    records = read_jsonl(write_teacher_responses(cfg))
    assert [record["messages"][:-1] for record in records] == [original["messages"][:-1] for original in originals]
    answers = [record["messages"][-1]["content"] for record in records]
    assert answers == [direct_greedy(teacher, original["messages"][:-1], end_of_turn) for original in originals]
    assert all(answers) and answers != [original["messages"][-1]["content"] for original in originals]

    objective = build_objective(cfg)
    objective.load_frozen()
    assert objective.teacher is None  # the teacher answered; it is not loaded for training
    tokenizer = load_tokenizer(cfg.model)
    _, stats = objective.build_loaders(tokenizer, accelerator=None)
    assert stats["train"].kept == len(originals) and stats["eval"] is None
    rows = build_train_split(tokenizer, objective.cfg.data, cfg.seed).rows.to_list()
    learned = [tokenizer.decode([i for i, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100])
               for row in rows]
    assert learned == [answer + "<|im_end|>" for answer in answers]  # the student's end of turn, in its tokens


def test_a_second_run_reads_the_cached_answers_without_loading_the_teacher(prompts, monkeypatch):
    path = write_teacher_responses(run_cfg(prompts))
    written = path.stat().st_mtime_ns
    monkeypatch.setattr(sequence_distill, "Teacher", lambda cfg: pytest.fail("the teacher was loaded again"))
    assert write_teacher_responses(run_cfg(prompts)) == path
    assert path.stat().st_mtime_ns == written


def test_the_cache_follows_the_teacher_the_data_and_the_generation_settings(prompts, tmp_path, tiny_model_path):
    base = responses_path(run_cfg(prompts))
    assert responses_path(run_cfg(prompts, "seed=7")) == base  # greedy answers do not depend on the seed
    sampled = responses_path(run_cfg(prompts, "distill.sample_temperature=0.7"))
    changed = [sampled, responses_path(run_cfg(prompts, "distill.sample_temperature=0.7", "seed=7")),
               responses_path(run_cfg(prompts, "distill.max_new_tokens=4")),
               responses_path(run_cfg(prompts, "data.chat_template=chatml")),
               responses_path(run_cfg(prompts, "model.dtype=bf16"))]
    teacher = shutil.copytree(tiny_model_path, tmp_path / "teacher")
    changed.append(responses_path(run_cfg(prompts, f"distill.teacher={teacher}")))
    (teacher / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))  # where its answers stop
    changed.append(responses_path(run_cfg(prompts, f"distill.teacher={teacher}")))
    assert len({base, *changed}) == 1 + len(changed)

    first = write_teacher_responses(run_cfg(prompts))
    with prompts.open("a") as handle:
        handle.write(CHAT.read_text().splitlines(keepends=True)[3])
    again = write_teacher_responses(run_cfg(prompts))
    assert again != first and len(read_jsonl(again)) == 3 and read_jsonl(again)[:2] == read_jsonl(first)


def test_sampled_answers_are_seeded_and_leave_the_runs_random_numbers_alone(prompts, tmp_path, monkeypatch):
    cfg = run_cfg(prompts, "distill.sample_temperature=1.0")
    torch.manual_seed(5)
    sampled = write_teacher_responses(cfg).read_text()
    after = torch.rand(4)
    torch.manual_seed(5)
    assert torch.equal(torch.rand(4), after)  # as if nothing had been drawn
    monkeypatch.setenv("FTUNE_CACHE", str(tmp_path / "other"))
    assert write_teacher_responses(cfg).read_text() == sampled
    assert write_teacher_responses(run_cfg(prompts)).read_text() != sampled


def test_an_interrupted_generation_leaves_no_file(prompts, monkeypatch):
    cfg = run_cfg(prompts)

    class Interrupted(sequence_distill.Teacher):
        def answer(self, prompt):
            if prompt[-1]["content"].startswith("Rewrite"):  # the second conversation
                raise KeyboardInterrupt
            return super().answer(prompt)

    monkeypatch.setattr(sequence_distill, "Teacher", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_teacher_responses(cfg)
    assert list(responses_path(cfg).parent.iterdir()) == []


@pytest.mark.parametrize("records,expected", [
    ([{"messages": [{"role": "user", "content": "Hi"}]}], r"prompts.jsonl:1: messages: expected an assistant turn"),
    ([{"text": "A document."}], "format text has no conversation whose last answer the teacher could give"),
    ([{"prompt": "Hi", "chosen": "a", "rejected": "b"}], "format preference has no conversation"),
    ([{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yes"}],
      "tools": [{"name": "weather"}]}], "prompts.jsonl:1: tools: distill.mode=sequence cannot show"),
])
def test_data_without_an_answer_to_replace_is_refused_before_the_teacher_loads(records, expected, tmp_path,
                                                                               monkeypatch):
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    monkeypatch.setattr(sequence_distill, "Teacher", lambda cfg: pytest.fail("the teacher was loaded"))
    with pytest.raises(DataError, match=expected):
        write_teacher_responses(run_cfg(data))


def resolved_config(overrides: list[str]):
    """The config `ftune train` records and compares on resume, with `distill.responses` filled in."""
    cfg, resolved = load_run_config(overrides)
    resolve_teacher_responses(cfg, resolved)
    assert resolved.distill.responses == cfg.distill.responses == str(responses_path(cfg))
    return resolved


def test_a_resume_compares_equal_until_the_teachers_files_change(prompts, tmp_path, tiny_model_path):
    teacher = shutil.copytree(tiny_model_path, tmp_path / "teacher")
    overrides = ["recipe=tiny_lora", "objective=distill", "distill.mode=sequence", f"distill.teacher={teacher}",
                 f"data.path={prompts}"]
    write_run_config(tmp_path / "run", resolved_config(overrides))
    checkpoint = tmp_path / "run" / "checkpoints" / "step-1"
    assert compare_with_checkpoint_config(checkpoint, resolved_config(overrides), force=False) == ResumeChanges()
    (teacher / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    with pytest.raises(ConfigError, match="breaks exact resume: distill.responses"):
        compare_with_checkpoint_config(checkpoint, resolved_config(overrides), force=False)


def test_ftune_train_records_where_the_answers_are(prompts, tmp_path, tiny_model_path):
    run = tmp_path / "run"
    assert main(["train", "recipe=tiny_lora", "objective=distill", "distill.mode=sequence",
                 f"distill.teacher={tiny_model_path}", f"distill.max_new_tokens={ANSWER_TOKENS}",
                 f"data.path={prompts}", "data.eval_path=null", "probe.path=null", "trainer.max_steps=2",
                 f"output_dir={run}"]) == 0
    config = OmegaConf.load(run / "config.yaml")
    assert config.data.path == str(prompts) and len(read_jsonl(Path(config.distill.responses))) == 2
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["learned_tokens"] > 0
