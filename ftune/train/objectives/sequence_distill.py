"""Sequence-level distillation (`objective=distill distill.mode=sequence`): the student learns the teacher's answers.

Kim & Rush (2016): instead of matching the teacher's distribution at every token (`distill.mode=logits`), the
teacher answers each training prompt once and the student is fine-tuned on those answers as on any SFT data. Only
text passes from one to the other, so the teacher may have another tokenizer (another family), and it is gone
before the student loads.

Each training conversation is cut before its last assistant turn; the teacher answers it (greedy, or sampled at
`distill.sample_temperature` from `seed`) as `ftune.eval.generation` prompts a model: the run's chat template made
concrete for the teacher's tokenizer, the generation prompt, and a stop at its end of turn. The conversations with
the teacher's answer in place of their last turn are a JSONL of canonical `messages` records, cached by teacher,
data and generation settings (`responses_path`) and published whole (`ftune.atomic`): a run interrupted while the
teacher answers leaves no file a later run would trust, and the next run with the same teacher and data (a
resume, a sweep over learning rates) reads it instead. The student then trains on it as `objective=sft` does; the
held-out set keeps its reference answers.
"""

import dataclasses
import gc
import json
from pathlib import Path

import torch
from accelerate import PartialState
from omegaconf import DictConfig

from ftune.atomic import atomic_file
from ftune.cache import cache_dir, file_signature, fingerprint
from ftune.config.schema import DataCfg, DataSourceCfg, ModelCfg, RunCfg
from ftune.data.formats import (
    PREFERENCE_FORMATS,
    RecordError,
    read_records,
    resolve_format,
    source_signature,
    to_canonical,
)
from ftune.data.pipeline import say
from ftune.data.templates import TEMPLATES, ChatTemplate, render, resolve_template
from ftune.errors import DataError
from ftune.eval.generation import (
    SamplingSettings,
    TransformersBackend,
    greedy_answer,
    padding_rows,
    split_last_answer,
    stop_token_ids,
)
from ftune.eval.probe import base_signature
from ftune.model.load import load_frozen, load_tokenizer
from ftune.model.quant import teacher_load_kwargs
from ftune.train.objectives.tokens import TokenObjective

CACHE_KIND = "teacher"
"""`$FTUNE_CACHE/teacher/<key>.jsonl`: the teacher's responses, one file per teacher, data and settings."""


def sequence_distillation(cfg: RunCfg) -> bool:
    """Whether the run learns the teacher's answers rather than its distributions."""
    return cfg.objective.name == "distill" and cfg.distill.mode == "sequence"


def teacher_cfg(cfg: RunCfg) -> ModelCfg:
    """The teacher as a model to load: `distill.teacher` as it is, in the student's dtype and attention kernel.

    Nothing else of `model` applies: the student's start adapter and added tokens are the student's own.
    """
    return ModelCfg(name_or_path=cfg.distill.teacher, dtype=cfg.model.dtype,
                    attn_implementation=cfg.model.attn_implementation)


def teacher_signature(cfg: RunCfg) -> dict:
    """What decides the teacher's answers besides the prompts.

    Its weights and how they load, and the files that set the prompt's tokens and where an answer stops (tokenizer,
    chat template, generation config).
    """
    teacher = teacher_cfg(cfg)
    local = Path(teacher.name_or_path)
    others = sorted(f for f in local.iterdir() if f.is_file() and f.suffix != ".safetensors") if local.is_dir() else []
    return {**base_signature(teacher), "bits": cfg.distill.teacher_bits, "files": [file_signature(f) for f in others]}


def prompts_signature(data: DataCfg) -> dict:
    """What decides the prompts: the training source, how its records are read, and the chat template."""
    template = TEMPLATES[data.chat_template].jinja if data.chat_template in TEMPLATES else data.chat_template
    return {"source": source_signature(data.path), "format": data.format, "roles": dict(data.roles),
            "template": template}


def responses_path(cfg: RunCfg) -> Path:
    """Where the teacher's responses for this run are cached, keyed by everything that decides them.

    File signatures and settings only, so it is known before anything loads. The seed decides sampled answers
    only.
    """
    distill = cfg.distill
    sampling = {"temperature": distill.sample_temperature, "seed": cfg.seed} if distill.sample_temperature else {}
    key = fingerprint(teacher_signature(cfg), prompts_signature(cfg.data), distill.max_new_tokens, sampling)
    return cache_dir(CACHE_KIND) / f"{key}.jsonl"


def resolve_teacher_responses(cfg: RunCfg, resolved: DictConfig) -> None:
    """Record where the teacher's responses are (`distill.responses`) in the typed config and in config.yaml.

    Before the run directory is compared with a resumed checkpoint's config: a resume with the same teacher and
    data compares equal, and one whose teacher's files changed shows as a change that breaks exact resume.
    """
    if sequence_distillation(cfg):
        cfg.distill.responses = resolved.distill.responses = str(responses_path(cfg))


class Teacher:
    """The teacher answering prompts: its model and tokenizer, the run's template made concrete for that tokenizer.

    The template is the run's (`data.chat_template`); `tokenizer` resolves to the teacher's own, so a teacher of
    another family is prompted in its own format.
    """

    def __init__(self, cfg: RunCfg):
        model_cfg = teacher_cfg(cfg)
        self.tokenizer = load_tokenizer(model_cfg, "distill.teacher")
        self.template: ChatTemplate = resolve_template(cfg.data.chat_template, self.tokenizer)
        self.model = load_frozen(model_cfg, "distill.teacher", **teacher_load_kwargs(cfg))
        self.max_new_tokens, self.temperature = cfg.distill.max_new_tokens, cfg.distill.sample_temperature
        self.sampler = TransformersBackend(SamplingSettings(
            1, self.max_new_tokens, self.temperature, 1.0, stop_token_ids(self.template, self.tokenizer, self.model),
            self.tokenizer.pad_token_id, padding_rows(self.model, self.tokenizer)))

    def answer(self, prompt: list[dict]) -> tuple[str, bool]:
        """The teacher's answer to the conversation `prompt`, and whether it reached `distill.max_new_tokens`."""
        if not self.temperature:
            answer, new_tokens = greedy_answer(self.model, self.tokenizer, self.template, prompt, self.max_new_tokens)
            return answer, new_tokens >= self.max_new_tokens
        text = render(self.template, prompt, self.tokenizer, add_generation_prompt=True)
        sampled = self.sampler.sample(self.model, [self.tokenizer.encode(text, add_special_tokens=False)])
        tokens = sampled.completion_ids[0][sampled.completion_mask[0].bool()]
        answer = self.tokenizer.decode(tokens, skip_special_tokens=True)  # then cut as greedy_answer cuts its own
        return answer.split(self.template.end_of_turn)[0].strip(), bool(sampled.truncated[0])


def training_conversations(data: DataCfg) -> list[tuple[str, dict]]:
    """(where, canonical record) of each training conversation, read and checked before the teacher loads.

    Raises:
        DataError: the source holds text or preference data (nothing for the teacher to answer), a conversation
            comes with tools (`greedy_answer` does not show them to the teacher), or a record does not fit its
            format (with `data.on_bad_record=skip` it is left out and counted instead).
    """
    records = list(read_records(data.path, data))
    fmt = resolve_format(records, data.path, data.format)
    if fmt == "text" or fmt in PREFERENCE_FORMATS:
        raise DataError(f"{data.path}: format {fmt} has no conversation whose last answer the teacher could give",
                        "distill.mode=sequence needs chat data; distill.mode=logits distills on any labelled tokens")
    kept, skipped = [], []
    for where, record in records:
        try:
            canonical = to_canonical(record, fmt, where, data.roles)
        except RecordError as err:
            if data.on_bad_record == "error":
                raise
            skipped.append(err)
            continue
        if "tools" in canonical:
            raise DataError(f"{where}: tools: distill.mode=sequence cannot show a conversation's tools to the "
                            "teacher", "give conversations without tools, or use distill.mode=logits")
        kept.append((where, canonical))
    if skipped:
        say(f"teacher: {len(skipped)} records of {data.path} left out (data.on_bad_record=skip), the first: "
            f"{skipped[0].one_line()}")
    return kept


def write_teacher_responses(cfg: RunCfg) -> Path:
    """The teacher's responses to the training prompts: read from the cache, or generated and written there whole.

    Every process may call it (inside `one_builder_per_disk`): the first to miss the cache writes it, the others
    then read it. The teacher is loaded and sampled inside a fork of torch's generators, so the run draws the same
    random numbers after this (its adapter's initialisation, its data order) whether the answers were generated
    or read; it is released before the student loads.

    Raises:
        DataError: see `training_conversations`; or the teacher answered no prompt with any text.
    """
    path = responses_path(cfg)
    if path.is_file():
        return path
    conversations = training_conversations(cfg.data)
    device = PartialState().device
    with torch.random.fork_rng(devices=[] if device.type == "cpu" else [device], device_type=device.type):
        torch.manual_seed(cfg.seed)
        teacher = Teacher(cfg)
        with atomic_file(path) as staging:
            written, truncated = write_answers(teacher, conversations, staging)
            if not written:
                raise DataError(f"distill.teacher={cfg.distill.teacher} answered none of the "
                                f"{len(conversations)} prompts of {cfg.data.path} with any text")
    del teacher
    gc.collect()  # its weights go now, not at some later collection while the student loads
    say(f"teacher: {written} answers by {cfg.distill.teacher} -> {path} ({truncated} reached "
        f"distill.max_new_tokens={cfg.distill.max_new_tokens}, {len(conversations) - written} empty and left out)")
    return path


def write_answers(teacher: Teacher, conversations: list[tuple[str, dict]], path: Path) -> tuple[int, int]:
    """Write each conversation with the teacher's answer as its last turn; returns (written, reached the limit).

    An empty answer is left out: an empty assistant turn has nothing to learn, and ftune reads no such record.
    """
    written = truncated = 0
    with path.open("w", encoding="utf-8") as handle:
        for _, record in conversations:
            prompt, _ = split_last_answer(record["messages"])
            answer, cut = teacher.answer(prompt)
            truncated += cut
            if answer:
                messages = [*prompt, {"role": "assistant", "content": answer}]
                handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
                written += 1
    return written, truncated


class SequenceDistillObjective(TokenObjective):
    """`objective=distill distill.mode=sequence`: `objective=sft` on the teacher's answers to the training prompts.

    The answers are generated (or read from the cache) when the loaders are built, before the student loads; no
    teacher is loaded frozen and the loss is the labels' cross-entropy. The answers are read as the one source of
    `data.mix`, in the `messages` format, so `data.format` still reads the held-out set, whose reference answers
    evaluation scores.
    """

    def build_loaders(self, tokenizer, accelerator) -> tuple[dict, dict]:
        responses = DataSourceCfg(str(write_teacher_responses(self.cfg)), 1.0, "messages")
        self.cfg = dataclasses.replace(self.cfg, data=dataclasses.replace(self.cfg.data, mix=[responses]))
        return super().build_loaders(tokenizer, accelerator)

    def load_frozen(self) -> None:
        """Nothing: the teacher answered before the student loads."""

    def describe(self) -> dict[str, str]:
        return super().describe() | {"teacher responses": self.cfg.data.mix[0].path}
