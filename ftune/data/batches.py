"""What a data worker does with one batch of records: canonical form, duplicate sketch, ids and labels.

Everything per token happens here, in numpy, so that the main process only decides per record (duplicates,
bad records) and writes; `ftune.data.pipeline.tokenize_source` runs these batches through
`ftune.data.workers.map_ordered` and keeps the statistics. A record's result never depends on which worker
or batch it fell in, so any `data.num_proc` gives the same rows.
"""

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from ftune.config.schema import DataCfg
from ftune.data.dedup import Sketch, sketch
from ftune.data.formats import Record, RecordError, record_features, to_canonical
from ftune.data.labels import TokenizedExample, tokenize_conversation, tokenize_text
from ftune.data.mask import IGNORE_INDEX
from ftune.data.templates import ChatTemplate
from ftune.errors import DataError

RECORDS_PER_BATCH = 256
"""Records a worker tokenizes per call: large enough that sending them costs little, small enough to keep
every worker busy to the end."""

DECODE_CHECK_EVERY = 16
"""With `data.check_labels=sample`, every this-many-th record (by position in its source) has its learned
tokens decoded and compared with the text. Measured (CPU time, 400 generated multi-turn chats, the embedded
tokenizer): decoding every record adds 10% to labelling, every 16th 0.6%. A template or tokenizer that breaks
labels breaks nearly every record, so a sample finds it, and every span a token straddles is decoded anyway."""

UNRENDERABLE = "the chat template cannot render it"


@dataclass
class BatchContext:
    """What every batch of a source needs; handed to each worker once."""

    tokenizer: object
    template: ChatTemplate | None
    cfg: DataCfg
    fmt: str
    near_limit: int | None
    """Records before this position in the source get a near-duplicate sketch (None: all of them)."""


@dataclass
class TokenizedBatch:
    """One batch's results: per record its location, error or duplicate sketch; per example its tokens.

    Examples are already truncated to `max_length`, laid end to end in `ids`/`labels`; `record` says which
    record (position in the batch) each came from.
    """

    wheres: list[str] = field(default_factory=list)
    errors: dict[int, RecordError] = field(default_factory=dict)
    """Records that do not fit their format (found before duplicates are looked for)."""
    render_errors: dict[int, RecordError] = field(default_factory=dict)
    """Records the chat template cannot render (count only if the record is not a removed duplicate)."""
    features: set[str] = field(default_factory=set)
    sketches: dict[int, Sketch] = field(default_factory=dict)
    record: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    learned: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    truncated_learned: list[bool] = field(default_factory=list)
    ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)

    def finish(self) -> "TokenizedBatch":
        """Turn the per-example lists into numpy arrays (cheaper to send to the main process and to mask)."""
        empty = np.zeros(0, np.int64)
        self.ids, self.labels = np.concatenate([empty, *self.ids]), np.concatenate([empty, *self.labels])
        self.record, self.lengths, self.learned = (np.array(v, np.int64) for v in (self.record, self.lengths,
                                                                                   self.learned))
        self.truncated, self.truncated_learned = np.array(self.truncated, bool), np.array(self.truncated_learned, bool)
        return self


def numbered_batches(records: Iterable[Record]) -> Iterator[tuple[int, list[Record]]]:
    """(position of the first record in the source, records) per RECORDS_PER_BATCH records."""
    iterator = iter(records)
    start = 0
    while batch := list(itertools.islice(iterator, RECORDS_PER_BATCH)):
        yield start, batch
        start += len(batch)


def tokenize_batch(context: BatchContext, numbered: tuple[int, list[Record]]) -> TokenizedBatch:
    """Canonical form, duplicate sketch and truncated examples of each record of a batch (see `TokenizedBatch`)."""
    start, records = numbered
    cfg, result = context.cfg, TokenizedBatch()
    for position, (where, record) in enumerate(records):
        result.wheres.append(where)
        try:
            canonical = to_canonical(record, context.fmt, where, cfg.roles)
        except RecordError as err:
            result.errors[position] = err
            continue
        result.features |= record_features(record, context.fmt, canonical)
        near = context.near_limit is None or start + position < context.near_limit
        result.sketches[position] = sketch(canonical, near)
        decode = cfg.check_labels == "all" or (start + position) % DECODE_CHECK_EVERY == 0
        try:
            examples = tokenize_record(canonical, where, context.tokenizer, context.template, cfg, decode)
        except RecordError as err:
            result.render_errors[position] = err
            continue
        for example in examples:
            add_example(result, position, example, cfg.max_length)
    return result.finish()


def tokenize_record(record: dict, where: str, tokenizer, template: ChatTemplate | None, cfg: DataCfg,
                    decode_check: bool = True) -> list[TokenizedExample]:
    """Ids and labels of one canonical record (see `formats.to_canonical`): one example, or one per rendering.

    Raises:
        RecordError: the chat template cannot render the conversation (named by `where`).
    """
    if "text" in record:
        return [tokenize_text(record["text"], tokenizer)]
    try:
        return tokenize_conversation(record["messages"], tokenizer, template, cfg.train_on, record.get("tools"),
                                     cfg.train_on_reasoning, decode_check)
    except DataError as err:
        raise RecordError(UNRENDERABLE, f"{where}: {err.message}", err.hint) from None


def add_example(result: TokenizedBatch, position: int, example: TokenizedExample, max_length: int) -> None:
    """Truncate an example to `max_length` and add it with its counts.

    The start is kept: the prompt matters more than a long answer's end.

    Example, max_length=3: ids [1, 2, 3, 4], labels [-100, -100, 3, 4] -> [1, 2, 3], [-100, -100, 3],
    truncated, truncated_learned (label 4 was cut), learned 1.
    """
    ids, labels = np.asarray(example.input_ids, np.int64), np.asarray(example.labels, np.int64)
    result.record.append(position)
    result.truncated.append(len(ids) > max_length)
    result.truncated_learned.append(bool((labels[max_length:] != IGNORE_INDEX).any()))
    ids, labels = ids[:max_length], labels[:max_length]
    result.lengths.append(len(ids))
    result.learned.append(count_learned(labels))
    result.ids.append(ids)
    result.labels.append(labels)


def count_learned(labels: np.ndarray) -> int:
    """How many labels the loss sees: [5, -100, 7, 8] -> 2.

    After the shift, position 0 is never a target, so a lone learned first token teaches nothing.
    """
    return int((labels[1:] != IGNORE_INDEX).sum())
