"""Prompts for online objectives (`objective=grpo`): each record's `prompt`, rendered up to the answer, and its columns.

A record is `{"prompt": ..., <any other columns>}` (`data.columns.prompt=question` reads the prompt from another
column). A string prompt is text the model continues as it is; a list of
messages is rendered by the chat template with the generation prompt (the header of the assistant turn), as
`ftune eval` and the training sampler prompt a model. Every other column reaches the reward functions by name,
as TRL passes them, which is how a reward sees its answer key. A prompt longer than `data.max_length` minus the
completion's room is dropped and counted, like a too-long training row.

Example: `{"prompt": [{"role": "user", "content": "2 + 3 = ?"}], "answer": "5"}` gives a row whose `prompt_ids`
end with the assistant header and whose `columns` are `{"answer": "5"}`.
"""

from dataclasses import dataclass, field

from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from ftune.config.schema import DataCfg
from ftune.data.formats import read_source, rename_columns
from ftune.data.pipeline import private_generator
from ftune.data.preference import prompt_messages
from ftune.data.sampler import RepeatedSteps
from ftune.data.templates import ChatTemplate, render
from ftune.errors import DataError

PROMPT_COLUMN = "prompt"
TOO_LONG = "a prompt longer than data.max_length minus grpo.max_completion_length"


@dataclass(frozen=True)
class PromptRow:
    """One prompt: as the file gives it (what reward functions receive), its token ids, and its other columns."""

    prompt: str | list[dict]
    prompt_ids: list[int]
    columns: dict


@dataclass
class PromptStats:
    """What reading a prompts file kept and dropped (the start table's examples row)."""

    kept: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0


def build_prompt_rows(path: str, tokenizer, template: ChatTemplate, cfg: DataCfg, room: int
                      ) -> tuple[list[PromptRow], PromptStats]:
    """Every record of `path` as a `PromptRow`, dropping prompts longer than `cfg.max_length - room` tokens.

    Raises:
        DataError: a line that is not JSON, a record that is not an object with a `prompt` (each naming its file
            and line), or a file with no prompt short enough to train on.
    """
    longest = cfg.max_length - room
    rows, stats = [], PromptStats()
    for where, record in rename_columns(read_source(path), cfg.columns, path):  # data.columns: {prompt: question}
        if isinstance(record, Exception):  # a line that is not JSON
            raise record
        if not isinstance(record, dict) or PROMPT_COLUMN not in record:
            raise DataError(f"{where}: expected an object with a 'prompt' (a string, or a list of messages) and any "
                            f"columns the reward functions read, got {type(record).__name__}")
        ids = prompt_ids(record[PROMPT_COLUMN], f"{where}: prompt", tokenizer, template)  # RecordError: one line
        if len(ids) > longest:
            stats.dropped[TOO_LONG] = stats.dropped.get(TOO_LONG, 0) + 1
            continue
        rows.append(PromptRow(record[PROMPT_COLUMN], ids, {k: v for k, v in record.items() if k != PROMPT_COLUMN}))
    stats.kept = len(rows)
    if not rows:
        raise DataError(f"{path}: no prompt of at most {longest} tokens (data.max_length={cfg.max_length} minus "
                        f"{room} for the completion)", "raise data.max_length or lower grpo.max_completion_length")
    return rows, stats


def prompt_ids(prompt: object, at: str, tokenizer, template: ChatTemplate) -> list[int]:
    """A text prompt's tokens as the tokenizer encodes text (with its BOS), or a conversation's rendered tokens."""
    if isinstance(prompt, str) and prompt.strip():
        return tokenizer.encode(prompt)
    text = render(template, prompt_messages(prompt, at), tokenizer, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def collate_prompts(rows: list[PromptRow]) -> dict:
    """A batch of prompts as lists (the sampler pads them itself): prompts, token ids and each column's values."""
    names = sorted({name for row in rows for name in row.columns})
    return {"prompts": [row.prompt for row in rows], "prompt_ids": [row.prompt_ids for row in rows],
            "columns": {name: [row.columns.get(name) for row in rows] for name in names}}


def build_prompt_loader(rows: list[PromptRow], batch_size: int, shuffle: bool, step_batches: int = 1,
                        times: int = 1) -> DataLoader:
    """Batches of `batch_size` prompts, drawn in random order each epoch when `shuffle`.

    `times` > 1: each optimizer step's `step_batches` batches come `times` times in a row (`RepeatedSteps`).
    """
    if times == 1:
        return DataLoader(rows, batch_size=batch_size, shuffle=shuffle, collate_fn=collate_prompts,
                          generator=private_generator())
    order = RandomSampler(rows, generator=private_generator()) if shuffle else SequentialSampler(rows)
    return DataLoader(rows, batch_sampler=RepeatedSteps(order, batch_size, step_batches, times),
                      collate_fn=collate_prompts, generator=private_generator())
