"""The data pipeline: sources -> records -> chat template -> tokens and labels -> truncation -> mix -> packing.

`build_train_split` (training data: `data.mix`, or `data.path`) and `build_split` (one source, e.g. held-out
data) return the rows and the statistics a user needs to trust them (how many records were read, truncated,
skipped or dropped, and why), served from a cache when nothing that shapes them changed; `build_loader`
batches them (padded, or packed with the attention inputs that isolate documents).

Memory does not grow with the data: sources are read lazily, batches of records are tokenized in worker
processes (`data.num_proc`, `ftune.data.batches`), examples go to disk as they come (`ftune.data.store`), and
mixing, packing and length-grouping work from arrays of lengths. The rows are a memory-mapped Arrow file.
"""

import dataclasses
import datetime
import functools
import importlib.metadata
import itertools
import json
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader

from ftune.atomic import atomic_dir
from ftune.cache import ABOUT_FILE, cache_dir, files_fingerprint, fingerprint
from ftune.config.schema import DataCfg, DataSourceCfg
from ftune.data.batches import BatchContext, TokenizedBatch, numbered_batches, tokenize_batch
from ftune.data.collate import build_collator
from ftune.data.dedup import NEAR_SEARCH_LIMIT, REMOVED_BY, DuplicateFinder, held_out_records, merge_reports, report
from ftune.data.formats import PREFERENCE_FORMATS, RecordError, read_records, resolve_format, source_signature
from ftune.data.sampler import LengthGroupedSampler
from ftune.data.store import Documents, TokenFile, TokenWriter, read_rows, write_rows
from ftune.data.templates import TEMPLATES_DIR, resolve_template
from ftune.data.workers import map_ordered, resolve_num_proc
from ftune.errors import DataError
from ftune.report.console import console

ROW_SHAPING_MODULES = ("formats.py", "messages.py", "dedup.py", "templates.py", "labels.py", "mask.py", "packing.py",
                       "batches.py", "store.py", "pipeline.py", "preference.py")
"""The modules of ftune/data whose code decides the cached rows and statistics; collate.py and sampler.py act
per batch, on rows already cached, and workers.py only runs batches, so changing them keeps the cache valid."""

STATS_FILE = "stats.json"
"""A cache entry's statistics, beside its rows; written last, so its presence marks a complete entry."""

NOT_SHAPING_ROWS = ("path", "eval_path", "mix", "pad_to_multiple_of", "group_by_length", "num_proc", "streaming",
                    "shuffle_buffer")
"""DataCfg fields left out of the settings part of the cache key: sources are keyed by content, padding and
batch order are decided per batch, the number of workers does not change the rows, and streaming only says
how the training data is read (a streamed run caches its held-out split, whose rows it does not change)."""

NOTHING_TO_LEARN = "no learned token left after truncation"
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
    """Training rows, each row's tokens and their story.

    Rows are `{"input_ids", "labels"}`, plus `position_ids`/`seq_lens` when packed; `lengths` serves batching
    without reading the rows.
    """

    rows: object
    stats: SplitStats
    lengths: np.ndarray
    from_cache: bool = False


@dataclass
class MemorySink:
    """Examples kept in memory as Python lists (small sources: `tokenize_split`)."""

    examples: list[dict] = field(default_factory=list)

    def write(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, learned: np.ndarray) -> None:
        for start, length in zip(np.cumsum(lengths) - lengths, lengths, strict=True):
            self.examples.append({"input_ids": ids[start : start + length].tolist(),
                                  "labels": labels[start : start + length].tolist()})


def tokenize_split(path: str, tokenizer, cfg: DataCfg) -> tuple[list[dict], SplitStats]:
    """The examples of one source as Python lists, and their statistics (`tokenize_source` into memory)."""
    sink = MemorySink()
    stats = tokenize_source(path, tokenizer, cfg, sink)
    return sink.examples, stats


def tokenize_source(path: str, tokenizer, cfg: DataCfg, sink) -> SplitStats:
    """Tokenize every record of one source into `sink`; truncate, and drop (counting) those with nothing to learn.

    Chat records (messages, sharegpt, message_list, alpaca, prompt_completion) go through the chat template and
    learn what `data.train_on` says; `text` records learn every token. With `data.on_bad_record=skip` a record
    that does not fit its format is dropped and counted under its reason (the first of each reason is printed).
    Duplicates, and overlap with `data.eval_path` (unless this source is that eval set), are reported and
    removed as `data.dedup` says (`ftune.data.dedup`). Batches of records are tokenized by `data.num_proc`
    workers; the records are judged and written here, in source order.

    Args:
        path: the source (see `ftune.data.formats`).
        tokenizer: a fast tokenizer.
        cfg: the data settings (`format` is this source's).
        sink: receives the kept examples (`write(ids, labels, lengths, learned)`, flat arrays).

    Returns:
        The statistics.

    Raises:
        DataError: a bad record (with `on_bad_record=error`), or no example left at all.
    """
    records, first = itertools.tee(read_records(path, cfg))
    fmt = resolve_format(first, path, cfg.format)
    del first  # tee holds what one copy read ahead of the other only while both exist
    if fmt in PREFERENCE_FORMATS:
        raise DataError(f"{path}: format {fmt} is preference data, which this objective does not train on",
                        "set objective=dpo (pairs) or objective=kto (unpaired rows), or give SFT data")
    if cfg.format == "auto":
        say(f"data: {path}: format {fmt} (detected from its first record)")
    template = resolve_template(cfg.chat_template, tokenizer) if fmt != "text" else None
    held_out = held_out_records(cfg) if cfg.eval_path and path != cfg.eval_path else []
    context = BatchContext(tokenizer, template, cfg, fmt, None if cfg.dedup == "near" else NEAR_SEARCH_LIMIT)
    stats, finder, first_errors, shape = SplitStats(), DuplicateFinder(held_out), {}, set()
    for batch in map_ordered(tokenize_batch, context, numbered_batches(records), resolve_num_proc(cfg.num_proc)):
        keep_batch(batch, finder, cfg, stats, first_errors, sink)
        shape |= batch.features
    report_skipped(path, stats, first_errors)
    if not stats.kept:
        raise DataError(f"{path}: no example left to train on (dropped: {stats.dropped})")
    stats.dedup = report(finder, cfg.dedup)
    stats.sources.append({"path": path, "format": fmt, "features": sorted(shape), "examples": stats.kept})
    return stats


def keep_batch(batch: TokenizedBatch, finder: DuplicateFinder, cfg: DataCfg, stats: SplitStats, first_errors: dict,
               sink) -> None:
    """Judge each record of a batch in order (bad, duplicate, unrenderable), count it, and write what is kept.

    A record that does not fit its format is skipped before duplicates are looked for; one that the template
    cannot render is skipped only if it is not a removed duplicate, as if duplicates went first.
    """
    kept = np.zeros(len(batch.wheres), dtype=bool)
    for position, where in enumerate(batch.wheres):
        stats.read += 1
        if position in batch.errors:
            skip_record(batch.errors[position], cfg, stats, first_errors)
            continue
        finding = finder.check(where, batch.sketches[position])
        if finding and finding.kind in REMOVED_BY[cfg.dedup]:
            stats.drop(finding.kind)
        elif position in batch.render_errors:
            skip_record(batch.render_errors[position], cfg, stats, first_errors)
        else:
            kept[position] = True
    examples = kept[batch.record]
    good = examples & (batch.learned > 0)
    stats.split_turns += int(examples.sum() - kept.sum())
    stats.truncated += int(batch.truncated[examples].sum())
    stats.truncated_learned += int(batch.truncated_learned[examples].sum())
    stats.drop(NOTHING_TO_LEARN, int((examples & ~good).sum()))
    stats.kept += int(good.sum())
    stats.tokens += int(batch.lengths[good].sum())
    stats.learned_tokens += int(batch.learned[good].sum())
    tokens = np.repeat(good, batch.lengths)
    sink.write(batch.ids[tokens], batch.labels[tokens], batch.lengths[good], batch.learned[good])


def skip_record(err: RecordError, cfg: DataCfg, stats: SplitStats, first_errors: dict) -> None:
    """Count a bad record under its reason (keeping the first message of each), or raise it with `error`."""
    if cfg.on_bad_record == "error":
        raise err
    stats.drop(err.reason)
    first_errors.setdefault(err.reason, err.one_line())


def report_skipped(path: str, stats, first_errors: dict) -> None:
    """One line per reason records of `path` were skipped for: how many, and the first one's message."""
    for reason, message in first_errors.items():
        say(f"data: {path}: {stats.dropped[reason]} record(s) skipped ({reason}); the first: {message}")


def say(line: str) -> None:
    """One plain line on the console: no markup (records hold brackets), no wrapping (so it greps)."""
    console.print(line, markup=False, highlight=False, soft_wrap=True)


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


def mix(sizes: list[int], weights: list[float], seed: int) -> list[np.ndarray]:
    """Which examples each source gives the mix (`mix_counts` of them), drawn without replacement by `seed`.

    Drawn examples keep their source's order. Example, seed 0: sizes [4, 2], weights [1, 1] -> two of
    0-3 in order (say [1, 3]), then [0, 1].
    """
    rng = random.Random(seed)
    return [np.array(sorted(rng.sample(range(size), count)), dtype=np.int64)
            for size, count in zip(sizes, mix_counts(sizes, weights), strict=True)]


def mixed_stats(parts: list[SplitStats], files: list[TokenFile], drawn: list[np.ndarray],
                weights: list[float]) -> SplitStats:
    """The sources' statistics merged; examples not drawn count as dropped, tokens are those of the drawn ones."""
    stats = SplitStats()
    for part, file, chosen, weight in zip(parts, files, drawn, weights, strict=True):
        stats.read += part.read
        stats.truncated += part.truncated
        stats.truncated_learned += part.truncated_learned
        stats.split_turns += part.split_turns
        stats.dedup = merge_reports(stats.dedup, part.dedup)
        for reason, dropped in part.dropped.items():
            stats.drop(reason, dropped)
        stats.drop(LEFT_OUT_BY_MIX, part.kept - len(chosen))
        stats.sources += [source | {"weight": weight, "drawn": len(chosen)} for source in part.sources]
        stats.kept += len(chosen)
        stats.tokens += int(file.lengths[chosen].sum())
        stats.learned_tokens += int(file.learned[chosen].sum())
    return stats


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
    otherwise built into a staging directory and published whole (`ftune.atomic.atomic_dir`): two processes
    that miss the same entry at once each build their own copy, the first rename publishes it and the later
    copy is discarded, since the same key means the same rows. A reader thus only sees a complete entry, one
    never replaced under it while its files are memory-mapped; a crash leaves no entry (only a staging
    directory that `ftune data --cache-clear` removes).
    """
    entry = cache_dir("data") / split_fingerprint(sources, tokenizer, cfg, seed)
    cached = load_entry(entry)
    if cached is not None:
        return cached
    with atomic_dir(entry, replace=False) as staging:
        files, parts = [], []
        for number, source in enumerate(sources):
            writer = TokenWriter(staging / f"tokens-{number}")
            parts.append(tokenize_source(source.path, tokenizer, dataclasses.replace(cfg, format=source.format),
                                         writer))
            files.append(writer.close())
        weights = [source.weight for source in sources]
        drawn = mix([part.kept for part in parts], weights, seed) if len(parts) > 1 else [np.arange(parts[0].kept)]
        stats = mixed_stats(parts, files, drawn, weights) if len(parts) > 1 else parts[0]
        documents = Documents(files, np.repeat(np.arange(len(files)), [len(d) for d in drawn]), np.concatenate(drawn))
        row_tokens = write_rows(staging, documents, cfg.max_length if cfg.packing else None)
        stats.rows = len(row_tokens)
        stats.row_capacity = stats.rows * cfg.max_length if cfg.packing else stats.tokens
        for number in range(len(files)):
            shutil.rmtree(staging / f"tokens-{number}")
        write_about(staging, sources, tokenizer, cfg, stats.rows, stats.tokens)
        (staging / STATS_FILE).write_text(json.dumps(dataclasses.asdict(stats)), encoding="utf-8")
    return dataclasses.replace(load_entry(entry), from_cache=False)


def load_entry(entry: Path) -> Split | None:
    """The split cached at `entry`, or None when there is none (a miss)."""
    if not (entry / STATS_FILE).is_file():
        return None
    stats = SplitStats(**json.loads((entry / STATS_FILE).read_text(encoding="utf-8")))
    rows, lengths = read_rows(entry)
    return Split(rows, stats, lengths, from_cache=True)


def write_about(directory: Path, sources: list[DataSourceCfg], tokenizer, cfg: DataCfg, rows: int,
                tokens: int) -> None:
    """What made an entry (and its rows and tokens), in words a person reads in `ftune data --cache-info`."""
    about = {
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sources": [source.path for source in sources],
        "tokenizer": getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__,
        "settings": {key: getattr(cfg, key) for key in ("format", "chat_template", "train_on", "max_length",
                                                        "packing", "dedup")},
        "rows": rows,
        "tokens": tokens,
    }
    (directory / ABOUT_FILE).write_text(json.dumps(about), encoding="utf-8")


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
    collate = build_collator(cfg, tokenizer.pad_token_id, attn_implementation)
    sampler = None
    if shuffle and cfg.group_by_length and not cfg.packing:
        sampler, shuffle = LengthGroupedSampler(split.lengths, batch_size, seed), False
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
