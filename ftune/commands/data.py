"""`ftune data`: build the training data exactly as `ftune train` does, and show what the model learns.

    ftune data recipe=tiny_lora                               statistics and the first 3 examples
    ftune data recipe=tiny_lora data.packing=true n=5 out=rows.jsonl
    ftune data recipe=tiny_lora data.streaming=true trainer.max_steps=9   the first 3 rows of the stream
    ftune data recipe=tiny_dpo n=3 out=pairs.jsonl            preference pairs: statistics, the first 3 pairs
    ftune data recipe=tiny_grpo                               GRPO's prompts: statistics, the first 3 prompts
    ftune data --cache-info                                   the data cache: entries, sizes, what made them
    ftune data --cache-clear                                  remove them

The statistics table says what happened to every record (read, kept, dropped and why, truncated), how many
tokens are learned, how full the rows and batches are, and whether the rows came from the cache. The first
`n` training examples follow as the model sees them, each kind of text in its own colour and learned tokens
bright (`ftune.data.show` draws both).
Duplicates and overlap with the eval set are reported (`ftune.data.dedup`); an overlap is a loud warning.
`out=FILE` writes every training row as JSONL `{"input_ids", "labels", "position_ids"}`.

With a preference objective (`objective=dpo` or `kto`) the statistics count pairs (read, kept, dropped by reason,
identical chosen and rejected, prompts cut), each pair shows its prompt once and then each response, all of whose
tokens are learned; `out=FILE` writes one JSON object per pair, `{"prompt_ids", "chosen_ids", "rejected_ids"}`
(`{"prompt_ids", "completion_ids", "label"}` for KTO), the response ids ending with the end-of-turn marker.
"""

import dataclasses
import itertools
import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from ftune.data.show import (
    batch_fill,
    describe,
    describe_pairs,
    describe_prompts,
    explain_examples,
    show_duplicates,
    show_examples,
    show_pairs,
    show_prompts,
    summarize,
    write_rows,
)
from ftune.errors import ConfigError, ResourceError
from ftune.report.console import console, print_table

DEFAULT_EXAMPLES = 3
"""Examples shown when `n=` is not given."""


def run(args) -> int:
    """Compose and validate the recipe, build its training split and loader, and report on them."""
    from ftune.config.compose import load_run_config, pop_command_keys

    if args.cache_info or args.cache_clear:
        return show_cache(args.cache_clear, args.json)
    own, overrides = pop_command_keys(args.overrides, ("n", "out"))
    cfg, resolved = load_run_config(overrides, tuple(args.config_dir))
    if args.cfg == "job":
        print(OmegaConf.to_yaml(resolved), end="")
        return 0
    count = parse_count(own.get("n", str(DEFAULT_EXAMPLES)))
    out = Path(own["out"]) if own.get("out") else None
    if out is not None and not out.parent.is_dir():
        raise ResourceError(f"out={out}: no such directory {out.parent}", "create it, or write elsewhere")
    if cfg.objective.learns_preferences:
        return report_pairs(cfg, count, out, args.json)
    if cfg.objective.samples_completions:
        return report_prompts(cfg, count, args.json)
    if cfg.data.streaming:
        return preview_stream(cfg, count, out, args.json)
    tokenizer, split, loader, seconds = build_train_data(cfg)
    report = summarize(split, seconds, batch_fill(loader, split.lengths), cfg)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(f"ftune data: {cfg.recipe}", describe(report))
        show_duplicates(split.stats.dedup, cfg.data.eval_path)
        show_examples(split.rows, tokenizer, count, explain_examples(cfg.data, tokenizer, count))
    if out is not None:
        write_rows(split.rows, out)
        console.print(f"wrote {report['stats']['rows']} rows to {out}", markup=False, highlight=False, soft_wrap=True)
    return 0


def report_pairs(cfg, count: int, out: Path | None, as_json: bool) -> int:
    """Preference data: build it as `ftune train` does, then its statistics, the first `count` pairs, the rows."""
    from ftune.data.preference import OBJECTIVE_FORMATS, build_preference_split
    from ftune.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    started = time.perf_counter()
    rows, stats = build_preference_split(cfg.data, tokenizer, formats=OBJECTIVE_FORMATS[cfg.objective.name])
    report = {"stats": dataclasses.asdict(stats), "from_cache": rows.from_cache,
              "seconds": round(time.perf_counter() - started, 3)}
    print_report(cfg, report, as_json, describe_pairs, lambda: show_pairs(rows, tokenizer, count))
    if out is not None:
        write_rows(rows, out, as_pairs=True)
        console.print(f"wrote {len(rows)} rows to {out}", markup=False, highlight=False, soft_wrap=True)
    return 0


def report_prompts(cfg, count: int, as_json: bool) -> int:
    """GRPO's prompts: read and rendered as `ftune train` does, then their statistics and the first `count`."""
    from ftune.data.prompts import build_prompt_rows
    from ftune.data.templates import resolve_template
    from ftune.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    started = time.perf_counter()
    template = resolve_template(cfg.data.chat_template, tokenizer)
    rows, stats = build_prompt_rows(cfg.data.path, tokenizer, template, cfg.data, cfg.grpo.max_completion_length)
    report = {"stats": dataclasses.asdict(stats), "columns": sorted({name for row in rows for name in row.columns}),
              "prompt_tokens": sum(len(row.prompt_ids) for row in rows),
              "seconds": round(time.perf_counter() - started, 3)}
    print_report(cfg, report, as_json, describe_prompts, lambda: show_prompts(rows, tokenizer, count))
    return 0


def print_report(cfg, report: dict, as_json: bool, table_rows, show_examples_of) -> None:
    """The report as one JSON line, or its statistics table (`table_rows(report)`) and then its examples."""
    if as_json:
        print(json.dumps(report))
    else:
        print_table(f"ftune data: {cfg.recipe}", table_rows(report))
        show_examples_of()


def show_cache(clear: bool, as_json: bool) -> int:
    """`--cache-info`: the data cache's entries, their size and what made them; `--cache-clear`: remove them."""
    from ftune.cache import cache_dir, cache_entries, clear_cache

    entries = clear_cache("data") if clear else cache_entries("data")
    rows = [describe_entry(entry) for entry in entries]
    if as_json:
        print(json.dumps({"cache": str(cache_dir("data")), "cleared": clear, "entries": rows}))
        return 0
    verb = "removed" if clear else "holds"
    total = sum(entry.size for entry in entries)
    console.print(f"{cache_dir('data')} {verb} {len(entries)} entries, {total / 2**20:.1f} MiB",
                  markup=False, highlight=False, soft_wrap=True)
    for row in rows:
        console.print("  " + "  ".join(f"{key}={value}" for key, value in row.items()), markup=False,
                      highlight=False, soft_wrap=True)
    return 0


def describe_entry(entry) -> dict:
    """One cache entry as a row: key, MiB, state, and what made it (sources, tokenizer, settings, rows, when)."""
    if entry.complete:
        state = "complete"
    elif entry.builder_pid is not None:
        state = f"being built by process {entry.builder_pid}"
    else:
        state = "incomplete, left by a build that stopped (never read; --cache-clear removes it)"
    return {"entry": entry.path.name, "mib": round(entry.size / 2**20, 1), "state": state, **entry.about}


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


def preview_stream(cfg, count: int, out: Path | None, as_json: bool) -> int:
    """With `data.streaming=true`: the first `count` streamed rows, as the first process trains on them.

    A stream builds no rows and no statistics before training reads it, so there is nothing to count or write.

    Raises:
        ConfigError: `out=` or `--json`, which need the rows built.
    """
    from ftune.data.stream import open_stream
    from ftune.model.load import load_tokenizer

    if out is not None or as_json:
        raise ConfigError("data.streaming=true builds no rows to write or count (expected neither out= nor --json, "
                          "or data.streaming=false to build and report them)")
    tokenizer = load_tokenizer(cfg.model)
    stream = open_stream(tokenizer, cfg.data, cfg.seed, cfg.trainer.micro_batch_size)
    console.print(f"data.streaming=true: no cache and no statistics; the first {count} rows of the stream of "
                  f"{cfg.data.path}", markup=False, highlight=False, soft_wrap=True)
    show_examples(list(itertools.islice(stream, count)), tokenizer, count, explain_examples(cfg.data, tokenizer, count))
    return 0


def parse_count(value: str) -> int:
    """`n=`: how many examples to show.

    Raises:
        ConfigError: not a whole number >= 0.
    """
    if not value.isdigit():
        raise ConfigError(f"n={value}: expected a whole number >= 0 (examples to show)")
    return int(value)


