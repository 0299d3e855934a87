"""Training data streamed (`data.streaming=true`): read, labelled, shuffled and packed while the model trains.

For training sets that fit neither in memory nor in the cache on disk. Each process reads the source lazily
(`stream_records`), keeps its share of the records (record i goes to process i % processes, before anything is
tokenized, so the processes train on disjoint parts), labels them with the in-memory path's own code
(`tokenize_batch` and `keep_batch`: the same ids, labels, truncation and drops), shuffles the examples in a
buffer of `data.shuffle_buffer`, then packs rows best-fit-decreasing within windows of `PACK_WINDOW_ROWS` rows
(`data.packing`) or sorts windows of 50 micro-batches by length (`data.group_by_length`), and batches them
(`StreamLoader`). Memory holds the buffers, never the data set. Duplicate removal (`data.dedup`) needs every
record's hash and `data.mix` every source's size, so `ftune.config.validate` refuses both with streaming.

The stream has no end: when the source runs out the next pass starts, reshuffled from (seed, pass, process),
so the loop's epoch stays 0 and `trainer.max_steps` ends the run. Every process takes `trainer.grad_accum`
micro-batches per step from a stream that never runs short, so the data position (micro-batches taken) is the
same on every process, and `TrainState.batch_in_epoch` holds it.

Exact resume replays the stream: it is a function of the source, the data settings, the tokenizer, the seed and
the process alone, so a resumed run reads it again from the start and drops the rows of the micro-batches already
trained on before they are collated. The cost is reading and labelling that many examples again, without the
model (ftune labels some 100-200 conversations a second per core; see docs/data.md, "Data at scale"). Saving the
buffers instead would put up to `data.shuffle_buffer` examples into every checkpoint, and would still need the
reader to seek back to a record, which a JSONL file allows but a hub stream does not; replay needs nothing but
the TrainState and is exact for every source.
"""

import functools
import itertools
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ftune.config.schema import DataCfg
from ftune.data.batches import BatchContext, numbered_batches, tokenize_batch
from ftune.data.collate import build_collator
from ftune.data.formats import (
    FILE_SUFFIXES,
    HUB_ID,
    Record,
    data_files,
    is_saved_dataset,
    iter_source,
    rename_columns,
    resolve_format,
    split_suffix,
)
from ftune.data.packing import pack
from ftune.data.pipeline import SplitStats, keep_batch, say
from ftune.data.sampler import MEGA_BATCH_MULT
from ftune.data.store import TOKEN_DTYPE
from ftune.data.templates import resolve_template
from ftune.errors import DataError, ResourceError

PACK_WINDOW_ROWS = 64
"""Packing gathers examples until they fill this many rows' worth of tokens, then packs them best-fit-decreasing:
memory holds one window, and only a window's last rows are left part empty."""


def stream_records(source: str) -> Iterator[Record]:
    """The records of a source, read lazily, located as `iter_source` locates them.

    Files, directories of them and `save_to_disk` directories (memory-mapped) are `iter_source`'s; a hub id, or a
    directory only `datasets.load_dataset` understands, is streamed by `datasets` rather than downloaded and
    converted whole, as the in-memory path does.

    Raises:
        ResourceError: `datasets` cannot stream the source.
    """
    if not streamed_by_datasets(source):
        return iter_source(source)
    import datasets

    location, split = split_suffix(source)
    try:
        dataset = datasets.load_dataset(location, split=split or "train", streaming=True)
    except Exception as err:  # datasets raises many types (FileNotFound, DatasetNotFound, ValueError, Hub errors)
        raise ResourceError(f"{source}: cannot stream it as a dataset ({str(err).splitlines()[0]})") from None
    return ((f"{source}[{index}]", record) for index, record in enumerate(dataset))


def streamed_by_datasets(source: str) -> bool:
    """Whether `datasets.load_dataset` reads `source` (a hub id, a hub snapshot directory) rather than ftune."""
    location, _ = split_suffix(source)
    path = Path(location)
    if path.is_file() or (path.is_dir() and (is_saved_dataset(path) or data_files(path))):
        return False
    return path.is_dir() or (path.suffix not in FILE_SUFFIXES and HUB_ID.fullmatch(location) is not None)


class NoDuplicateCheck:
    """`keep_batch`'s duplicate finder for a stream: finds none, since finding them means keeping every hash."""

    def check(self, where: str, sketch) -> None:
        return None


@dataclass
class ExampleSink:
    """Receives `keep_batch`'s kept examples (flat arrays) as one dict of int32 arrays per example.

    Each example is copied out of its batch, so one left in the shuffle buffer does not keep the whole batch
    alive; numpy holds a token in 4 bytes where a Python list of ints takes about 36.
    """

    examples: list[dict] = field(default_factory=list)

    def write(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, learned: np.ndarray) -> None:
        if not len(lengths):
            return
        cuts = np.cumsum(lengths)[:-1]
        for example_ids, example_labels in zip(np.split(ids, cuts), np.split(labels, cuts), strict=True):
            self.examples.append({"input_ids": example_ids.astype(TOKEN_DTYPE),
                                  "labels": example_labels.astype(TOKEN_DTYPE)})


def shuffled(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """`items` shuffled within a buffer of `size` (0: in order); the buffer is all that is held.

    The buffer fills first; then each item read takes the place of one drawn at random, which goes out, and at
    the end the rest go out in random order. An item comes out at most `size` places before its place in `items`,
    and any number of places after it.

    Example, size 2: a b c d -> buffer [a, b]; c takes (say) b's place: b; d takes a's: a; then d, c or c, d.
    """
    if size == 0:
        yield from items
        return
    buffer = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = rng.randrange(size)
        yield buffer[slot]
        buffer[slot] = item
    rng.shuffle(buffer)
    yield from buffer


def grouped_by_length(examples: Iterable[dict], window: int) -> Iterator[dict]:
    """Examples sorted longest first within windows of `window`, so each micro-batch pads to similar lengths.

    The window is the length-grouped sampler's mega-batch (50 micro-batches) over an already shuffled stream.

    Example, window 3, lengths 2 5 1 4 3 -> 5 2 1 4 3
    """
    iterator = iter(examples)
    while window_examples := list(itertools.islice(iterator, window)):
        yield from sorted(window_examples, key=lambda example: len(example["input_ids"]), reverse=True)


def packed(examples: Iterable[dict], max_length: int, window_rows: int = PACK_WINDOW_ROWS) -> Iterator[dict]:
    """Rows packed by `pack` (best-fit-decreasing, documents isolated) from windows of `window_rows` rows' tokens.

    Example, max_length 5, window_rows 1: lengths 3 2 4 1 -> window [3, 2] -> row [3 2]; window [4, 1] -> [4 1]
    """
    window, tokens = [], 0
    for example in examples:
        window.append(example)
        tokens += len(example["input_ids"])
        if tokens >= window_rows * max_length:
            yield from pack(window, max_length)
            window, tokens = [], 0
    if window:
        yield from pack(window, max_length)


@dataclass
class TrainingStream:
    """This process's rows of the training data, pass after pass, without end (see the module docstring)."""

    context: BatchContext
    seed: int
    length_window: int
    """Examples sorted together by `data.group_by_length` (50 micro-batches)."""
    rank: int = 0
    world: int = 1
    stats: SplitStats = field(default_factory=SplitStats)
    """Records read, kept and dropped (by reason) so far, over every pass."""
    first_errors: dict[str, str] = field(default_factory=dict)
    pass_number: int = 0
    rows_in_pass: int = 0
    first_pass_rows: int | None = None

    @property
    def cfg(self) -> DataCfg:
        return self.context.cfg

    @property
    def passes(self) -> float:
        """Passes over this process's records so far, as the loop's `epoch`.

        Whole passes, plus the part of the current one once the first pass has told how many rows a pass holds
        (packed passes differ by a few rows).
        """
        if not self.first_pass_rows:
            return float(self.pass_number)
        return self.pass_number + min(1.0, self.rows_in_pass / self.first_pass_rows)

    def __iter__(self) -> Iterator[dict]:
        for pass_number in itertools.count():
            self.pass_number, self.rows_in_pass = pass_number, 0
            for row in self.pass_rows(pass_number):
                self.rows_in_pass += 1
                yield row
            if not self.rows_in_pass:
                share = f" in process {self.rank}'s share (record i goes to process i % {self.world})"
                raise DataError(f"{self.cfg.path}: no example left to train on{share if self.world > 1 else ''} "
                                f"(dropped: {self.stats.dropped})")
            self.first_pass_rows = self.first_pass_rows or self.rows_in_pass

    def pass_rows(self, pass_number: int) -> Iterator[dict]:
        """One pass's rows: the examples shuffled (seeded by seed, pass and process), then packed or grouped."""
        rng = random.Random(f"{self.seed}/{pass_number}/{self.rank}")  # a str seeds the same in every process
        examples = shuffled(self.examples(), self.cfg.shuffle_buffer, rng)
        if self.cfg.packing:
            return packed(examples, self.cfg.max_length)
        if self.cfg.group_by_length:
            return grouped_by_length(examples, self.length_window)
        return examples

    def examples(self) -> Iterator[dict]:
        """This process's examples of one pass in source order, kept or dropped as the in-memory path does.

        A bad record stops the run (`data.on_bad_record=error`) or is skipped, its reason said once.
        """
        records = rename_columns(stream_records(self.cfg.path), self.cfg.columns, self.cfg.path)
        mine = itertools.islice(records, self.rank, None, self.world)
        for batch in map(functools.partial(tokenize_batch, self.context), numbered_batches(mine)):
            sink, known = ExampleSink(), set(self.first_errors)
            keep_batch(batch, NoDuplicateCheck(), self.cfg, self.stats, self.first_errors, sink)
            for reason, first in self.first_errors.items():
                if reason not in known:
                    say(f"data: {self.cfg.path}: skipping records ({reason}); the first: {first}")
            yield from sink.examples


def open_stream(tokenizer, cfg: DataCfg, seed: int, batch_size: int, rank: int = 0, world: int = 1) -> TrainingStream:
    """The training stream of `data.path` for process `rank` of `world`; reads the first record to detect the format.

    Raises:
        DataError: the source is empty, or its format cannot be detected.
    """
    fmt = resolve_format(rename_columns(stream_records(cfg.path), cfg.columns, cfg.path), cfg.path, cfg.format)
    template = resolve_template(cfg.chat_template, tokenizer) if fmt != "text" else None
    context = BatchContext(tokenizer, template, replace(cfg, format=fmt), fmt, near_limit=0)
    return TrainingStream(context, seed, MEGA_BATCH_MULT * batch_size, rank, world)


@dataclass
class StreamLoader:
    """Micro-batches of a `TrainingStream` on `device`: what the training loop asks of a loader, no more.

    accelerate's prepared loaders do not fit a stream: under several processes they would split it again (each
    process reading every row to keep a slice of each batch), and they resume by collating every skipped batch
    (for packed rows, a mask of width x width each). The stream is already this process's share, and this loader
    drops the rows of skipped batches before they are collated.
    """

    stream: TrainingStream
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    batch_size: int
    device: torch.device | str = "cpu"
    skipped_batches: int = 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows = itertools.islice(self.stream, self.skipped_batches * self.batch_size, None)
        while batch := list(itertools.islice(rows, self.batch_size)):
            yield {key: value.to(self.device) for key, value in self.collate(batch).items()}

    def skip_first_batches(self, count: int) -> "StreamLoader":
        """This loader from micro-batch `count` on: where a resumed run continues."""
        return replace(self, skipped_batches=count)

    def set_epoch(self, epoch: int) -> None:
        """Nothing to set: the stream never ends for the loop, and reshuffles each pass itself."""

    @property
    def passes(self) -> float:
        return self.stream.passes


def build_stream_loader(tokenizer, cfg: DataCfg, attn_implementation: str, batch_size: int, seed: int,
                        rank: int = 0, world: int = 1, device: torch.device | str = "cpu") -> StreamLoader:
    """Micro-batches of process `rank` of `world`'s share of the streamed training data, padded or packed."""
    stream = open_stream(tokenizer, cfg, seed, batch_size, rank, world)
    return StreamLoader(stream, build_collator(cfg, tokenizer.pad_token_id, attn_implementation), batch_size, device)
