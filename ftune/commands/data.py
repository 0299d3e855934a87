"""`ftune data`: build the training data exactly as `ftune train` does, and show what the model learns.

    ftune data recipe=tiny_lora                               statistics and the first 3 examples
    ftune data recipe=tiny_lora data.packing=true n=5 out=rows.jsonl

The statistics table says what happened to every record (read, kept, dropped and why, truncated), how many
tokens are learned, how full the rows and batches are, and whether the rows came from the cache. The first
`n` training examples follow as the model sees them: learned tokens green, the rest dim, special tokens
(BOS, end of turn) bold; without colours (a pipe, a log file) learned text is marked ⟦like this⟧.
`out=FILE` writes every training row as JSONL `{"input_ids", "labels", "position_ids"}`.
"""

import dataclasses
import itertools
import json
import time
from pathlib import Path

from omegaconf import OmegaConf
from rich.text import Text

from ftune.atomic import atomic_file
from ftune.data.mask import IGNORE_INDEX
from ftune.errors import ConfigError, ResourceError
from ftune.report.console import console, print_table

DEFAULT_EXAMPLES = 3
"""Examples shown when `n=` is not given."""

LEARNED_MARKS = ("⟦", "⟧")
"""Around learned text when the console has no colours."""


def run(args) -> int:
    """Compose and validate the recipe, build its training split and loader, and report on them."""
    from ftune.config.compose import load_run_config, pop_command_keys

    own, overrides = pop_command_keys(args.overrides, ("n", "out"))
    cfg, resolved = load_run_config(overrides, tuple(args.config_dir))
    if args.cfg == "job":
        print(OmegaConf.to_yaml(resolved), end="")
        return 0
    count = parse_count(own.get("n", str(DEFAULT_EXAMPLES)))
    out = Path(own["out"]) if own.get("out") else None
    if out is not None and not out.parent.is_dir():
        raise ResourceError(f"out={out}: no such directory {out.parent}", "create it, or write elsewhere")
    tokenizer, split, loader, seconds = build_train_data(cfg)
    report = summarize(split, seconds, batch_fill(loader, cfg.seed), cfg)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(f"ftune data: {cfg.recipe}", describe(report))
        show_examples(split.rows, tokenizer, count)
    if out is not None:
        write_rows(split.rows, out)
        console.print(f"wrote {report['stats']['rows']} rows to {out}", markup=False, highlight=False, soft_wrap=True)
    return 0


def build_train_data(cfg):
    """The tokenizer, the training split and its loader, built with the functions `ftune train` uses."""
    from ftune.data.pipeline import build_loader, build_train_split
    from ftune.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    started = time.perf_counter()
    split = build_train_split(tokenizer, cfg.data, cfg.seed)
    seconds = time.perf_counter() - started
    loader = build_loader(split, tokenizer, cfg.data, cfg.model.attn_implementation, cfg.trainer.micro_batch_size,
                          shuffle=True, seed=cfg.seed)
    return tokenizer, split, loader, seconds


def parse_count(value: str) -> int:
    """`n=`: how many examples to show.

    Raises:
        ConfigError: not a whole number >= 0.
    """
    if not value.isdigit():
        raise ConfigError(f"n={value}: expected a whole number >= 0 (examples to show)")
    return int(value)


def batch_fill(loader, seed: int) -> float:
    """Real tokens over token slots (rows x padded width) in one shuffled pass over the training batches."""
    import torch

    torch.manual_seed(seed)  # the shuffle order, hence which rows share a batch and its padding
    real = slots = 0
    for batch in loader:
        real += int(batch["num_tokens"])
        slots += batch["input_ids"].numel()
    return real / slots


def summarize(split, seconds: float, fill: float, cfg) -> dict:
    """Everything the report shows, JSON-ready (what `--json` prints)."""
    stats = dataclasses.asdict(split.stats)
    return {
        "stats": stats,
        "packing": cfg.data.packing,
        "packing_fill": stats["tokens"] / stats["row_capacity"] if cfg.data.packing else None,
        "batch_fill": fill,
        "micro_batch_size": cfg.trainer.micro_batch_size,
        "from_cache": split.from_cache,
        "seconds": round(seconds, 3),
    }


def describe(report: dict) -> dict[str, str]:
    """The statistics table's rows."""
    stats = report["stats"]
    dropped = ", ".join(f"{reason}: {count}" for reason, count in stats["dropped"].items())
    return {
        "sources": "\n".join(describe_source(source) for source in stats["sources"]),
        "examples read / kept": f"{stats['read']} / {stats['kept']}",
        "dropped": f"{sum(stats['dropped'].values())}" + (f" ({dropped})" if dropped else ""),
        "truncated": f"{stats['truncated']} ({stats['truncated_learned']} lost learned tokens)",
        "tokens / learned": f"{stats['tokens']:,} / {stats['learned_tokens']:,} "
                            f"({stats['learned_tokens'] / stats['tokens']:.1%} learned)",
        "rows": f"{stats['rows']:,}" + (" (packed)" if report["packing"] else ""),
        "packing fill": f"{report['packing_fill']:.1%}" if report["packing"] else "not packed",
        "batch fill": f"{report['batch_fill']:.1%} real tokens / padded slots "
                      f"(micro-batches of {report['micro_batch_size']})",
        "cache": "hit" if report["from_cache"] else "miss (built, now cached)",
        "time": f"{report['seconds']:.2f} s",
    }


def describe_source(source: dict) -> str:
    """One source's line: path, format, examples (and its share of a mix)."""
    line = f"{source['path']} ({source['format']}): {source['examples']} examples"
    if "drawn" in source:
        line += f", weight {source['weight']:g}: {source['drawn']} drawn"
    return line


def show_examples(rows, tokenizer, count: int) -> None:
    """Print the first `count` training documents (a packed row holds several) as the model learns them."""
    if count:
        console.print("learned tokens in green, the rest dim; special tokens bold", style="italic")
    for row_index, doc_index, input_ids, labels in itertools.islice(documents(rows), count):
        learned = sum(label != IGNORE_INDEX for label in labels)
        console.rule(f"row {row_index}, document {doc_index}: {len(input_ids)} tokens, {learned} learned")
        console.print(render_tokens(input_ids, labels, tokenizer, marks=console.color_system is None))


def documents(rows):
    """Yield (row, document, input_ids, labels) for each document of each row, in training-row order."""
    for row_index, row in enumerate(rows):
        lengths = row.get("seq_lens") or [len(row["input_ids"])]
        starts = itertools.accumulate(lengths, initial=0)  # one more than lengths: zip stops at the last document
        for doc_index, (start, length) in enumerate(zip(starts, lengths, strict=False)):
            end = start + length
            yield row_index, doc_index, row["input_ids"][start:end], row["labels"][start:end]


def render_tokens(input_ids: list[int], labels: list[int], tokenizer, marks: bool = False) -> Text:
    r"""The decoded tokens, styled by whether each is learned (green) or not (dim); special tokens bold.

    Consecutive tokens of the same kind are decoded together, so multi-byte characters split across tokens
    decode whole. Example (ChatML): ids of "<|im_start|>assistant\nHi<|im_end|>\n" with "Hi<|im_end|>" learned
    -> "<|im_start|>" bold dim, "assistant\n" dim, "Hi" green, "<|im_end|>" bold green, "\n" dim.

    Args:
        input_ids: one document's ids.
        labels: its labels (-100 where not learned).
        tokenizer: decodes the ids.
        marks: also wrap learned text in ⟦ ⟧, for output without colours.
    """
    special = set(tokenizer.all_special_ids)
    text = Text()
    pairs = zip(input_ids, labels, strict=True)
    kinds = itertools.groupby(pairs, key=lambda pair: (pair[1] != IGNORE_INDEX, pair[0] in special))
    previous = False
    for (learned, is_special), group in kinds:
        piece = tokenizer.decode([token for token, _ in group], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
        if marks and learned != previous:
            text.append(LEARNED_MARKS[0] if learned else LEARNED_MARKS[1])
        text.append(piece, style=("bold " if is_special else "") + ("green" if learned else "dim"))
        previous = learned
    if marks and previous:
        text.append(LEARNED_MARKS[1])
    return text


def write_rows(rows, path: Path) -> None:
    """Write every row as a JSON line `{"input_ids", "labels", "position_ids"}`, atomically.

    Unpacked rows get positions 0..n-1; packed rows keep theirs (restarting at each document). The lines
    stream into a temporary file beside `path` (`atomic_file`), so a failure or Ctrl-C halfway leaves the
    previous `path`, or none, rather than a truncated file that looks complete.
    """
    with atomic_file(path) as staging, staging.open("w", encoding="utf-8") as handle:
        for row in rows:
            positions = row.get("position_ids") or list(range(len(row["input_ids"])))
            handle.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"],
                                     "position_ids": positions}) + "\n")
