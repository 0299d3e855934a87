"""How built training data is shown to a person (`ftune data`): statistics tables, examples with learned tokens.

The statistics say what happened to every record (read, kept, dropped and why, truncated), how many tokens are
learned and how full the rows and batches are; the examples show each kind of text in its own colour (answer
green, tool calls cyan, reasoning magenta, tool results yellow, tool schemas blue, prompt grey), bright where
learned and dim where not, special tokens bold; without colours (a pipe, a log file) learned text is marked
⟦like this⟧ and each kind but prompt and answer opens with a tag such as «tool result».
"""

import dataclasses
import itertools
import json
from pathlib import Path

from rich.text import Text

from ftune.atomic import atomic_file
from ftune.data.collate import padded_width
from ftune.data.dedup import EVAL_EXACT, EVAL_NEAR, EXACT, NEAR, overlap_warning
from ftune.data.mask import IGNORE_INDEX
from ftune.report.console import console

LEARNED_MARKS = ("⟦", "⟧")
"""Around learned text when the console has no colours."""

KIND_STYLES = {
    "prompt": "white", "answer": "green", "end_of_turn": "green", "tool_call": "cyan", "reasoning": "magenta",
    "tool_result": "yellow", "tools": "blue",
}
"""Colour of each kind of text (`ftune.data.explain`); learned tokens are shown bright, the rest dim."""

KIND_TAGS = {"tools": "«tools»", "tool_result": "«tool result»", "reasoning": "«reasoning»", "tool_call": "«tool call»"}
"""Tags that open a run of each kind when the console has no colours."""

EXPLAINED_RECORDS = 50
"""How many records of the first source are re-rendered to name the kinds of the examples shown."""


def describe_pairs(report: dict) -> dict[str, str]:
    """The statistics table's rows for preference data."""
    from ftune.data.preference import IDENTICAL

    stats = report["stats"]
    dropped = ", ".join(f"{reason}: {count}" for reason, count in stats["dropped"].items())
    unit = "rows" if stats["sources"][0]["format"] == "unpaired_preference" else "pairs"
    return {
        "sources": "\n".join(f"{source['path']} ({source['format']}"
                             + (f": {', '.join(source['features'])}" if source["features"] else "")
                             + f"): {source['pairs']} {unit}" for source in stats["sources"]),
        f"{unit} read / kept": f"{stats['read']} / {stats['kept']}",
        "dropped": f"{sum(stats['dropped'].values())}" + (f" ({dropped})" if dropped else ""),
        **({"identical chosen and rejected": f"{stats['dropped'].get(IDENTICAL, 0)} (dropped)"} if unit == "pairs"
           else {}),
        "prompts truncated": f"{stats['truncated']} (cut from the left; responses are never cut)",
        "tokens prompt / response": f"{stats['prompt_tokens']:,} / {stats['response_tokens']:,} "
                                    "(every response token is learned)",
        "cache": "hit" if report["from_cache"] else "miss (built, now cached)",
        "time": f"{report['seconds']:.2f} s",
    }


def show_pairs(rows, tokenizer, count: int) -> None:
    """Print the first `count` pairs: the prompt once (not learned), then each response (every token learned)."""
    if count:
        console.print("each prompt once (dim, not learned), then each response (learned, bright); special tokens "
                      "bold", style="italic")
    marks = console.color_system is None
    for index, row in enumerate(itertools.islice(rows, count)):
        responses = {key.removesuffix("_ids"): ids for key, ids in row.items()
                     if key.endswith("_ids") and key != "prompt_ids"}
        label = {True: " (desirable)", False: " (undesirable)"}.get(row.get("label"), "")
        console.rule(f"pair {index}: prompt {len(row['prompt_ids'])} tokens, "
                     + ", ".join(f"{name} {len(ids)}" for name, ids in responses.items()) + label)
        console.print(render_tokens(row["prompt_ids"], [IGNORE_INDEX] * len(row["prompt_ids"]), tokenizer, marks))
        for name, ids in responses.items():
            console.print(Text(f"{name}:", style="bold"), render_tokens(ids, ids, tokenizer, marks))



def describe_prompts(report: dict) -> dict[str, str]:
    """The statistics table's rows for GRPO's prompts."""
    stats = report["stats"]
    dropped = ", ".join(f"{reason}: {count}" for reason, count in stats["dropped"].items())
    return {
        "prompts kept": str(stats["kept"]),
        "dropped": f"{sum(stats['dropped'].values())}" + (f" ({dropped})" if dropped else ""),
        "columns (for the reward functions)": ", ".join(report["columns"]) or "none",
        "prompt tokens": f"{report['prompt_tokens']:,} (completions are sampled while training)",
        "time": f"{report['seconds']:.2f} s",
    }


def show_prompts(rows, tokenizer, count: int) -> None:
    """Print the first `count` prompts as the model reads them (up to the answer) and their columns."""
    marks = console.color_system is None
    for index, row in enumerate(itertools.islice(rows, count)):
        console.rule(f"prompt {index}: {len(row.prompt_ids)} tokens")
        console.print(render_tokens(row.prompt_ids, [IGNORE_INDEX] * len(row.prompt_ids), tokenizer, marks))
        console.print(Text(json.dumps(row.columns, ensure_ascii=False), style="italic"))

def batch_fill(loader, lengths) -> float:
    """Real tokens over token slots (rows x padded width) in one shuffled pass over the training batches.

    Computed from the rows' lengths in the order the loader's batch sampler gives, as the loader's collator pads
    (to the longest row, rounded up to its `pad_to_multiple_of`), so no row is read or collated.
    """
    multiple = loader.collate_fn.pad_to_multiple_of
    real = slots = 0
    for indices in loader.batch_sampler:
        widths = lengths[indices]
        real += int(widths.sum())
        slots += padded_width(int(widths.max()), multiple) * len(indices)
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
        "examples read / kept": f"{stats['read']} / {stats['kept']}"
                                + (f" ({stats['split_turns']} more from turn-by-turn rendering)"
                                   if stats.get("split_turns") else ""),
        "dropped": f"{sum(stats['dropped'].values())}" + (f" ({dropped})" if dropped else ""),
        "truncated": f"{stats['truncated']} ({stats['truncated_learned']} lost learned tokens)",
        "tokens / learned": f"{stats['tokens']:,} / {stats['learned_tokens']:,} "
                            f"({stats['learned_tokens'] / stats['tokens']:.1%} learned)",
        "rows": f"{stats['rows']:,}" + (" (packed)" if report["packing"] else ""),
        "packing fill": f"{report['packing_fill']:.1%}" if report["packing"] else "not packed",
        "batch fill": f"{report['batch_fill']:.1%} real tokens / padded slots "
                      f"(micro-batches of {report['micro_batch_size']})",
        **describe_dedup(stats.get("dedup")),
        "cache": "hit" if report["from_cache"] else "miss (built, now cached)",
        "time": f"{report['seconds']:.2f} s",
    }


def describe_dedup(dedup: dict | None) -> dict[str, str]:
    """The rows on duplicates and eval overlap: found, removed, and the rule that found them."""
    if not dedup:
        return {}
    counts, removed = dedup["counts"], dedup["removed"]
    rule = (f"near = Jaccard >= {dedup['threshold']:g} over character 5-grams, searched in "
            f"{dedup['near_searched']:,} of {dedup['records']:,} records")
    rows = {"duplicates": f"{counts[EXACT]} exact, {counts[NEAR]} near ({rule}); "
                          f"{removed[EXACT] + removed[NEAR]} removed (data.dedup={dedup['mode']})"}
    if dedup["eval_checked"]:
        rows["eval overlap"] = (f"{counts[EVAL_EXACT]} exact, {counts[EVAL_NEAR]} near; "
                                f"{removed[EVAL_EXACT] + removed[EVAL_NEAR]} removed from training")
    return rows


def show_duplicates(dedup: dict, eval_path: str | None) -> None:
    """The examples of duplicates found, then the overlap warning (in red) if training overlaps the eval set."""
    for example in (dedup or {}).get("examples", []):
        console.print(f"  {example['kind']}: {example['where']} repeats {example['other']} "
                      f"(Jaccard {example['similarity']:g})", markup=False, highlight=False, soft_wrap=True)
    warning = overlap_warning(dedup, eval_path)
    if warning:
        console.print(warning, style="bold red", markup=False, highlight=False, soft_wrap=True)


def describe_source(source: dict) -> str:
    """One source's line: path, format and what its conversations use, examples (and its share of a mix)."""
    features = f": {', '.join(source['features'])}" if source.get("features") else ""
    line = f"{source['path']} ({source['format']}{features}): {source['examples']} examples"
    if "drawn" in source:
        line += f", weight {source['weight']:g}: {source['drawn']} drawn"
    return line


def show_examples(rows, tokenizer, count: int, kinds: dict | None = None) -> None:
    """Print the first `count` training documents (a packed row holds several) as the model learns them.

    Args:
        rows: the training rows.
        tokenizer: decodes them.
        count: how many documents to show.
        kinds: token ids of a document -> the kind of each token (`explain_examples`); plain colours without.
    """
    if count:
        console.print("learned bright, the rest dim: answer green, tool call cyan, reasoning magenta, tool result "
                      "yellow, tools blue, prompt grey; special tokens bold", style="italic")
    for row_index, doc_index, input_ids, labels in itertools.islice(documents(rows), count):
        learned = sum(label != IGNORE_INDEX for label in labels)
        console.rule(f"row {row_index}, document {doc_index}: {len(input_ids)} tokens, {learned} learned")
        doc_kinds = (kinds or {}).get(tuple(input_ids))
        console.print(render_tokens(input_ids, labels, tokenizer, marks=console.color_system is None, kinds=doc_kinds))


def explain_examples(data_cfg, tokenizer, count: int) -> dict[tuple, list[str]]:
    """Token kinds of the examples of the first records of the first source, keyed by their (truncated) ids.

    The rows hold ids and labels only; to name what each token is, the first records are rendered again with
    the functions that built the rows, and a shown document takes the kinds of the example with its ids.
    """
    from ftune.data.batches import tokenize_record
    from ftune.data.explain import token_kinds
    from ftune.data.formats import RecordError, read_records, resolve_format, to_canonical
    from ftune.data.templates import resolve_template

    path = data_cfg.mix[0].path if data_cfg.mix else data_cfg.path
    records = list(itertools.islice(read_records(path, data_cfg), EXPLAINED_RECORDS + count))
    fmt = resolve_format(records, path, data_cfg.mix[0].format if data_cfg.mix else data_cfg.format)
    template = resolve_template(data_cfg.chat_template, tokenizer) if fmt != "text" else None
    explained = {}
    for where, record in records:
        try:
            canonical = to_canonical(record, fmt, where, data_cfg.roles)
            examples = tokenize_record(canonical, where, tokenizer, template, data_cfg)
        except RecordError:
            continue
        for example in examples:
            kinds = token_kinds(example, canonical, tokenizer, template)
            explained[tuple(example.input_ids[: data_cfg.max_length])] = kinds[: data_cfg.max_length]
    return explained


def documents(rows):
    """Yield (row, document, input_ids, labels) for each document of each row, in training-row order."""
    for row_index, row in enumerate(rows):
        lengths = row.get("seq_lens") or [len(row["input_ids"])]
        starts = itertools.accumulate(lengths, initial=0)  # one more than lengths: zip stops at the last document
        for doc_index, (start, length) in enumerate(zip(starts, lengths, strict=False)):
            end = start + length
            yield row_index, doc_index, row["input_ids"][start:end], row["labels"][start:end]


def render_tokens(input_ids: list[int], labels: list[int], tokenizer, marks: bool = False,
                  kinds: list[str] | None = None) -> Text:
    r"""The decoded tokens, styled by kind and by whether each is learned (bright) or not (dim); specials bold.

    Consecutive tokens of the same style are decoded together, so multi-byte characters split across tokens
    decode whole. Example (ChatML, no kinds): ids of "<|im_start|>assistant\nHi<|im_end|>\n" with
    "Hi<|im_end|>" learned -> "<|im_start|>" bold dim, "assistant\n" dim, "Hi" green, "<|im_end|>" bold green,
    "\n" dim. With kinds, a learned tool call is cyan, an unlearned tool result dim yellow, and so on.

    Args:
        input_ids: one document's ids.
        labels: its labels (-100 where not learned).
        tokenizer: decodes the ids.
        marks: also wrap learned text in ⟦ ⟧ and open each kind with its tag, for output without colours.
        kinds: the kind of each token (`ftune.data.explain`); without, learned is green and the rest dim.
    """
    special = set(tokenizer.all_special_ids)
    text = Text()
    kinds = kinds if kinds is not None and len(kinds) == len(input_ids) else None
    tokens = zip(input_ids, labels, kinds or [None] * len(input_ids), strict=True)
    groups = itertools.groupby(tokens, key=lambda token: (token[1] != IGNORE_INDEX, token[0] in special, token[2]))
    previous, previous_kind = False, None
    for (learned, is_special, kind), group in groups:
        piece = tokenizer.decode([token for token, _, _ in group], skip_special_tokens=False,
                                 clean_up_tokenization_spaces=False)
        if marks and learned != previous:
            text.append(LEARNED_MARKS[0] if learned else LEARNED_MARKS[1])
        if marks and kind != previous_kind and kind in KIND_TAGS:
            text.append(KIND_TAGS[kind])
        text.append(piece, style=token_style(learned, is_special, kind))
        previous, previous_kind = learned, kind
    if marks and previous:
        text.append(LEARNED_MARKS[1])
    return text


def token_style(learned: bool, is_special: bool, kind: str | None) -> str:
    """The rich style of a token: its kind's colour (green without kinds), dim unless learned, bold if special.

    Example: a learned tool-call token -> "cyan"; an unlearned special token without kinds -> "bold dim".
    """
    colour = KIND_STYLES[kind] if kind else "green"
    return ("bold " if is_special else "") + (colour if learned else ("dim" if kind is None else f"dim {colour}"))


def write_rows(rows, path: Path, as_pairs: bool = False) -> None:
    """Write every row as a JSON line `{"input_ids", "labels", "position_ids"}` (pairs: as they are), atomically.

    Unpacked rows get positions 0..n-1; packed rows keep theirs (restarting at each document). Preference rows
    are written whole (`{"prompt_ids", "chosen_ids", "rejected_ids"}`). The lines stream into a temporary file
    beside `path` (`atomic_file`), so a failure or Ctrl-C halfway leaves the previous `path`, or none, rather than
    a truncated file that looks complete.
    """
    with atomic_file(path) as staging, staging.open("w", encoding="utf-8") as handle:
        for row in rows:
            if as_pairs:
                handle.write(json.dumps(row) + "\n")
                continue
            positions = row.get("position_ids") or list(range(len(row["input_ids"])))
            handle.write(json.dumps({"input_ids": row["input_ids"], "labels": row["labels"],
                                     "position_ids": positions}) + "\n")
