"""The data pipeline: sources -> records -> chat template -> tokens and labels -> truncation -> mix -> packing.

`build_train_split` (training data: `data.mix`, or `data.path`) and `build_split` (one source, e.g. held-out
data) return the rows and the statistics a user needs to trust them (how many records were read, truncated,
skipped or dropped, and why), served from a cache when nothing that shapes them changed; `build_loader`
batches them (padded, or packed with the attention inputs that isolate documents).
"""

import dataclasses
import functools
import importlib.metadata
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import DataLoader

from ftune.atomic import atomic_dir
from ftune.cache import cache_dir, files_fingerprint, fingerprint
from ftune.config.schema import DataCfg, DataSourceCfg
from ftune.data.collate import PackedCollator, PadCollator
from ftune.data.dedup import deduplicate, held_out_records, merge_reports
from ftune.data.formats import (
    RecordError,
    read_source,
    record_features,
    resolve_format,
    source_signature,
    to_canonical,
)
from ftune.data.labels import TokenizedExample, tokenize_conversation, tokenize_text
from ftune.data.mask import IGNORE_INDEX
from ftune.data.packing import pack
from ftune.data.sampler import LengthGroupedSampler
from ftune.data.templates import TEMPLATES_DIR, ChatTemplate, resolve_template
from ftune.errors import DataError
from ftune.report.console import console

ROW_SHAPING_MODULES = ("formats.py", "messages.py", "dedup.py", "templates.py", "labels.py", "mask.py", "packing.py",
                       "pipeline.py")
"""The modules of ftune/data whose code decides the cached rows and statistics; collate.py and sampler.py act
per batch, on rows already cached, so changing them keeps the cache valid."""

STATS_FILE = "stats.json"
"""A cache entry's statistics, beside the rows `datasets` saved."""

NOT_SHAPING_ROWS = ("path", "eval_path", "mix", "pad_to_multiple_of", "group_by_length")
"""DataCfg fields left out of the settings part of the cache key: sources are keyed by content, padding and
batch order are decided per batch."""

NOTHING_TO_LEARN = "no learned token left after truncation"
UNRENDERABLE = "the chat template cannot render it"
LEFT_OUT_BY_MIX = "left out by the data.mix weights"


@dataclass
class SplitStats:
    """What happened to the records of one split: `read` = `kept` + the sum of `dropped`.

    `read`, `truncated` and `dropped` count every record read; `kept`, `tokens`, `learned_tokens` and `rows`
    describe the rows trained on (after `data.mix`).
    """

    read: int = 0
    kept: int = 0
    truncated: int = 0
    truncated_learned: int = 0
    """Truncated examples that lost learned tokens (the end of an answer, or its end-of-turn marker)."""
    dropped: dict[str, int] = field(default_factory=dict)
    """Reason -> examples: bad records (data.on_bad_record=skip), duplicates removed by data.dedup, nothing left
    to learn, left out by data.mix."""
    split_turns: int = 0
    """Examples beyond one per record: conversations whose template renders earlier turns differently later
    (Qwen3's reasoning) are learned turn by turn; read + split_turns = kept + the sum of dropped."""
    dedup: dict = field(default_factory=dict)
    """Duplicates and eval overlap found, and removed by data.dedup (see ftune.data.dedup.report)."""
    tokens: int = 0
    learned_tokens: int = 0
    rows: int = 0
    row_capacity: int = 0
    """Token slots of the rows (rows x max_length when packed); fill = tokens / row_capacity."""
    sources: list[dict] = field(default_factory=list)
    """Per source: `path`, `format`, `features` (tools, tool calls, reasoning, ...), `examples` kept; with data.mix
    also its `weight` and the examples `drawn`."""

    def drop(self, reason: str, count: int = 1) -> None:
        if count:
            self.dropped[reason] = self.dropped.get(reason, 0) + count


@dataclass
class Split:
    """Training rows (`{"input_ids", "labels"}`, plus `position_ids`/`seq_lens` when packed) and their story."""

    rows: object
    stats: SplitStats
    from_cache: bool = False


def truncate(input_ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """Keep the first `max_length` tokens: the prompt's start matters more than a long answer's end.

    Example, max_length=3: ids [1, 2, 3, 4], labels [-100, 2, 3, 4] -> [1, 2, 3], [-100, 2, 3]
    """
    return input_ids[:max_length], labels[:max_length]


def count_learned(labels: list[int]) -> int:
    """How many labels the loss sees: [5, -100, 7, 8] -> 2.

    After the shift, position 0 is never a target, so a lone learned first token teaches nothing.
    """
    return sum(label != IGNORE_INDEX for label in labels[1:])


def tokenize_split(path: str, tokenizer, cfg: DataCfg) -> tuple[list[dict], SplitStats]:
    """Tokenize every record of one source, in any format; truncate, and drop (counting) those with nothing to learn.

    Chat records (messages, sharegpt, message_list, alpaca, prompt_completion) go through the chat template and
    learn what `data.train_on` says; `text` records learn every token. With `data.on_bad_record=skip` a record
    that does not fit its format is dropped and counted under its reason (the first of each reason is printed).
    Duplicates, and overlap with `data.eval_path` (unless this source is that eval set), are reported and
    removed as `data.dedup` says (`ftune.data.dedup`).

    Returns:
        The examples (`{"input_ids", "labels"}`, at most `max_length` tokens) and their statistics.

    Raises:
        DataError: a bad record (with `on_bad_record=error`), or no example left at all.
    """
    records = read_source(path)
    fmt = resolve_format(records, path, cfg.format)
    if cfg.format == "auto":
        say(f"data: {path}: format {fmt} (detected from its first record)")
    template = resolve_template(cfg.chat_template, tokenizer) if fmt != "text" else None
    stats, examples, first_errors, shape = SplitStats(), [], {}, set()
    canonical = []
    for where, record in records:
        stats.read += 1
        try:
            canonical.append((where, to_canonical(record, fmt, where, cfg.roles)))
        except RecordError as err:
            skip_record(err, cfg, stats, first_errors)
            continue
        shape |= record_features(record, fmt, canonical[-1][1])
    held_out = held_out_records(cfg) if cfg.eval_path and path != cfg.eval_path else []
    for where, record in deduplicate(canonical, held_out, cfg.dedup, stats):
        try:
            tokenized = tokenize_record(record, where, tokenizer, template, cfg)
        except RecordError as err:
            skip_record(err, cfg, stats, first_errors)
            continue
        stats.split_turns += len(tokenized) - 1
        for example in tokenized:
            keep_example(example, cfg.max_length, stats, examples)
    for reason, message in first_errors.items():
        say(f"data: {path}: {stats.dropped[reason]} record(s) skipped ({reason}); the first: {message}")
    if not examples:
        raise DataError(f"{path}: no example left to train on (dropped: {stats.dropped})")
    stats.sources.append({"path": path, "format": fmt, "features": sorted(shape), "examples": len(examples)})
    return examples, stats


def skip_record(err: RecordError, cfg: DataCfg, stats: SplitStats, first_errors: dict) -> None:
    """Count a bad record under its reason (keeping the first message of each), or raise it with `error`."""
    if cfg.on_bad_record == "error":
        raise err
    stats.drop(err.reason)
    first_errors.setdefault(err.reason, err.one_line())


def say(line: str) -> None:
    """One plain line on the console: no markup (records hold brackets), no wrapping (so it greps)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


def tokenize_record(
    record: dict, where: str, tokenizer, template: ChatTemplate | None, cfg: DataCfg
) -> list[TokenizedExample]:
    """Ids and labels of one canonical record (see `formats.to_canonical`): one example, or one per rendering.

    Raises:
        RecordError: the chat template cannot render the conversation (named by `where`).
    """
    if "text" in record:
        return [tokenize_text(record["text"], tokenizer)]
    try:
        return tokenize_conversation(record["messages"], tokenizer, template, cfg.train_on, record.get("tools"),
                                     cfg.train_on_reasoning)
    except DataError as err:
        raise RecordError(UNRENDERABLE, f"{where}: {err.message}", err.hint) from None


def keep_example(example: TokenizedExample, max_length: int, stats: SplitStats, examples: list[dict]) -> None:
    """Truncate an example to `max_length` and keep it unless nothing is left to learn; count either way.

    Example, max_length=3: ids [1, 2, 3, 4], labels [-100, -100, 3, 4] -> kept as [1, 2, 3], [-100, -100, 3],
    counted as truncated and as truncated_learned (label 4 was cut).
    """
    input_ids, labels = example.input_ids, example.labels
    if len(input_ids) > max_length:
        stats.truncated += 1
        stats.truncated_learned += any(label != IGNORE_INDEX for label in labels[max_length:])
        input_ids, labels = truncate(input_ids, labels, max_length)
    learned = count_learned(labels)
    if learned == 0:
        stats.drop(NOTHING_TO_LEARN)
        return
    stats.kept += 1
    stats.tokens += len(input_ids)
    stats.learned_tokens += learned
    examples.append({"input_ids": input_ids, "labels": labels})


def mix_counts(sizes: list[int], weights: list[float]) -> list[int]:
    """How many examples each source gives the mix: its share (weight / sum of weights) of the largest total.

    The total is the largest that repeats no example: the source with the fewest examples for its share is
    taken whole, the others are subsampled.

    Examples:
        sizes [400, 200], weights [0.8, 0.2] -> total min(400 / 0.8, 200 / 0.2) = 500 -> [400, 100]
        sizes [400, 200], weights [1, 1]     -> total min(400 / 0.5, 200 / 0.5) = 400 -> [200, 200]
    """
    shares = [weight / sum(weights) for weight in weights]
    total = min(size / share for size, share in zip(sizes, shares, strict=True))
    return [min(size, round(share * total)) for size, share in zip(sizes, shares, strict=True)]


def mix(parts: list[tuple[list[dict], SplitStats]], weights: list[float], seed: int) -> tuple[list[dict], SplitStats]:
    """Draw each source's count (`mix_counts`) by a sample without replacement seeded by `seed`.

    Drawn examples keep their source's order; the statistics are merged, examples not drawn count as dropped.

    Example, seed 0: sources [a, b, c, d] and [x, y], weights [1, 1] -> 2 of a-d in order (say [b, d]), then
    [x, y]; stats.dropped {"left out by the data.mix weights": 2}.
    """
    counts = mix_counts([len(examples) for examples, _ in parts], weights)
    rng = random.Random(seed)
    mixed, stats = [], SplitStats()
    for (examples, part), count, weight in zip(parts, counts, weights, strict=True):
        mixed += [examples[index] for index in sorted(rng.sample(range(len(examples)), count))]
        stats.read += part.read
        stats.truncated += part.truncated
        stats.truncated_learned += part.truncated_learned
        stats.split_turns += part.split_turns
        stats.dedup = merge_reports(stats.dedup, part.dedup)
        for reason, dropped in part.dropped.items():
            stats.drop(reason, dropped)
        stats.drop(LEFT_OUT_BY_MIX, len(examples) - count)
        stats.sources += [source | {"weight": weight, "drawn": count} for source in part.sources]
    stats.kept = len(mixed)
    stats.tokens = sum(len(example["input_ids"]) for example in mixed)
    stats.learned_tokens = sum(count_learned(example["labels"]) for example in mixed)
    return mixed, stats


def build_train_split(tokenizer, cfg: DataCfg, seed: int) -> Split:
    """The training rows: the sources of `data.mix` mixed by weight (seeded by `seed`), or `data.path`.

    Raises:
        ConfigError: a `data.mix` weight that is not a positive number.
    """
    return build_rows(cfg.mix or [DataSourceCfg(cfg.path, 1.0, cfg.format)], tokenizer, cfg, seed)


def build_split(path: str, tokenizer, cfg: DataCfg) -> Split:
    """The rows of one source (held-out data, or training data without `data.mix`)."""
    return build_rows([DataSourceCfg(path, 1.0, cfg.format)], tokenizer, cfg, seed=0)


def build_rows(sources: list[DataSourceCfg], tokenizer, cfg: DataCfg, seed: int) -> Split:
    """The rows of sources (each read in its own format), mixed by weight when there are several.

    Served from the cache when the sources, the code and every setting that shapes the rows are unchanged;
    otherwise built and cached (see `save_entry`).
    """
    from datasets import Dataset

    entry = cache_dir("data") / split_fingerprint(sources, tokenizer, cfg, seed)
    cached = load_entry(entry)
    if cached is not None:
        return cached
    parts = [tokenize_split(source.path, tokenizer, dataclasses.replace(cfg, format=source.format))
             for source in sources]
    examples, stats = mix(parts, [source.weight for source in sources], seed) if len(parts) > 1 else parts[0]
    rows = pack(examples, cfg.max_length) if cfg.packing else examples
    stats.rows = len(rows)
    stats.row_capacity = len(rows) * cfg.max_length if cfg.packing else stats.tokens
    dataset = Dataset.from_list(rows)
    save_entry(entry, dataset, stats)
    return Split(dataset, stats)


def load_entry(entry: Path) -> Split | None:
    """The split cached at `entry`, or None when there is none (a miss)."""
    from datasets import load_from_disk

    if not (entry / STATS_FILE).is_file():
        return None
    stats = SplitStats(**json.loads((entry / STATS_FILE).read_text(encoding="utf-8")))
    return Split(load_from_disk(str(entry)), stats, from_cache=True)


def save_entry(entry: Path, dataset, stats: SplitStats) -> None:
    """Cache a split at `entry`: written under a name of this process's own, then renamed into place.

    Two runs that miss the same entry at once (a sweep, two terminals, the ranks of one launch) each write
    their own copy; the first rename publishes it and the later copy is discarded (`replace=False`), since
    the same key means the same rows. A reader thus only sees a complete entry, and one never replaced under
    it while its files are memory-mapped; a crash leaves no entry at all.
    """
    with atomic_dir(entry, replace=False) as staging:
        dataset.save_to_disk(str(staging))
        (staging / STATS_FILE).write_text(json.dumps(dataclasses.asdict(stats)), encoding="utf-8")


def split_fingerprint(sources: list[DataSourceCfg], tokenizer, cfg: DataCfg, seed: int) -> str:
    """Key of the cache: sources, tokenizer and every data setting that shapes the rows.

    Sources are keyed by content (file signatures) and format, with several sources also by weight and the
    seed; the tokenizer by its vocabulary, special tokens and template.

    We key the cache ourselves rather than rely on `datasets`' transform hashing, which hashes the Python
    function and cannot see a changed tokenizer file or chat template behind the same object.
    """
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_SHAPING_ROWS}
    mixing = {"weights": [source.weight for source in sources], "seed": seed} if len(sources) > 1 else None
    tokenizer_state = {
        "vocab": fingerprint(tokenizer.backend_tokenizer.to_str()),
        "special": tokenizer.all_special_tokens,
        "template": tokenizer.chat_template,
    }
    settings["eval_set"] = eval_set_signature(sources, cfg)  # the overlap check reads it (ftune.data.dedup)
    signatures = [(source_signature(source.path), source.format) for source in sources]
    return fingerprint(code_fingerprint(), signatures, mixing, tokenizer_state, settings)


ROW_SHAPING_LIBRARIES = ("transformers", "tokenizers", "jinja2")
"""Libraries whose upgrade can change tokens or rendered templates, so their versions are part of the key."""


@functools.cache
def code_fingerprint() -> str:
    """A hash of the code and library versions that shape rows, computed once per process.

    The code is `row_shaping_files`; the libraries tokenize and render templates. It replaces a hand-bumped
    version number, which a change could forget: then an old cache would be served rows that the new code
    would build differently.
    """
    versions = {name: importlib.metadata.version(name) for name in ROW_SHAPING_LIBRARIES}
    return fingerprint(files_fingerprint(row_shaping_files()), versions)


def row_shaping_files() -> list[Path]:
    """The source files of `ROW_SHAPING_MODULES` and the shipped chat templates they render with, in name order."""
    modules = [Path(__file__).with_name(name) for name in ROW_SHAPING_MODULES]
    return sorted(modules) + sorted(TEMPLATES_DIR.glob("*.jinja"))


def eval_set_signature(sources: list[DataSourceCfg], cfg: DataCfg) -> dict | None:
    """The eval set's signature when these sources are checked against it for overlap (they are not that set)."""
    if cfg.eval_path and any(source.path != cfg.eval_path for source in sources):
        return source_signature(cfg.eval_path)
    return None


def build_loader(split: Split, tokenizer, cfg: DataCfg, attn_implementation: str, batch_size: int,
                 shuffle: bool, workers: int = 0, seed: int = 0) -> DataLoader:
    """Batches of rows: padded, or packed with the attention inputs `attn_implementation` needs.

    Shuffled loaders with `data.group_by_length` (and no packing) draw similar lengths together, seeded by `seed`.
    """
    collate = (
        PackedCollator(tokenizer.pad_token_id, attn_implementation, pad_to_multiple_of=cfg.pad_to_multiple_of)
        if cfg.packing
        else PadCollator(tokenizer.pad_token_id, cfg.pad_to_multiple_of)
    )
    sampler = None
    if shuffle and cfg.group_by_length and not cfg.packing:
        lengths = [len(ids) for ids in split.rows["input_ids"]]
        sampler, shuffle = LengthGroupedSampler(lengths, batch_size, seed), False
    return DataLoader(split.rows, batch_size=batch_size, shuffle=shuffle, sampler=sampler, collate_fn=collate,
                      num_workers=workers, generator=private_generator())


def private_generator():
    """A random generator for one DataLoader, so that iterating it never touches torch's global RNG.

    Starting an iterator over a DataLoader draws a seed from its generator, and without one from the global
    RNG; that would shift dropout masks whenever a loader is iterated an extra time (a resumed run's skip, a
    probe measured instead of cached) and break exact resume.
    """
    import torch

    return torch.Generator().manual_seed(0)
