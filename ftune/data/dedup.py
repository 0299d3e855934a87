"""Duplicates within a training source, and training examples that overlap the eval set.

Found on canonical records, before tokenizing, over each conversation's text without its system turn (roles,
contents, reasoning, tool calls; a `text` record's text), lowercased with whitespace collapsed. The system
turn and the tool schemas are left out because many datasets share one long system prompt by design: kept in,
they would make any two short conversations look alike.

- exact duplicate: the same text as an earlier training record;
- near duplicate: Jaccard similarity >= `NEAR_THRESHOLD` (0.8) between the sets of character 5-grams
  (`SHINGLE`) of the two texts. Candidates come from MinHash LSH (datasketch: 128 permutations), and each is
  confirmed with the exact Jaccard of the two sets, so no pair below the threshold is reported;
- eval overlap: a training record that is an exact or near duplicate of a record of `data.eval_path`.

The first record of a group is kept; later ones are reported. `data.dedup` says what is removed: `none`
(report only), `exact` (exact duplicates and exact eval overlaps) or `near` (all of them). Removed records count
as dropped under their kind, so `read = kept + dropped` still holds. Only training data is checked: the eval
set is what overlap is measured against, and mixed sources are each checked on their own.
"""

import dataclasses
from dataclasses import dataclass

from ftune.config.schema import DataCfg
from ftune.data.formats import RecordError, read_source, resolve_format, to_canonical

NEAR_THRESHOLD = 0.8
SHINGLE = 5
NUM_PERM = 128
EXAMPLES_KEPT = 3
"""Examples of each kind kept for the report."""

EXACT, NEAR, EVAL_EXACT, EVAL_NEAR = "exact duplicate", "near duplicate", "exact eval overlap", "near eval overlap"
"""Kinds of finding; each is also the reason its removed records are counted under."""

REMOVED_BY = {"none": (), "exact": (EXACT, EVAL_EXACT), "near": (EXACT, NEAR, EVAL_EXACT, EVAL_NEAR)}
"""`data.dedup` -> the kinds it removes."""


@dataclass
class Finding:
    """A training record that repeats another: which kind, where it is, what it repeats and how closely."""

    kind: str
    where: str
    other: str
    similarity: float


def dedup_text(record: dict) -> str:
    r"""The text duplicates are judged on: every turn but the system's, or a `text` record's text, normalised.

    Example: {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi  There"},
              {"role": "assistant", "content": "Hello"}]} -> "user: hi there\nassistant: hello"
    """
    if "text" in record:
        return " ".join(record["text"].lower().split())
    lines = []
    for message in record["messages"]:
        if message["role"] != "system":
            parts = [message.get("reasoning_content", ""), message["content"],
                     *(str(call["function"]) for call in message.get("tool_calls", []))]
            lines.append(f"{message['role']}: " + " ".join(" ".join(parts).lower().split()))
    return "\n".join(lines)


def shingles(text: str) -> set[str]:
    """The character 5-grams of a text (the text itself when shorter): "abcdef" -> {"abcde", "bcdef"}."""
    return {text[i : i + SHINGLE] for i in range(max(1, len(text) - SHINGLE + 1))}


def jaccard(a: set[str], b: set[str]) -> float:
    """|a & b| / |a | b|: {"ab", "cd"} and {"ab", "ef"} -> 1/3."""
    return len(a & b) / len(a | b) if a or b else 1.0


class NearIndex:
    """Records' shingle sets in a MinHash LSH index; `match` returns the first near duplicate of a text, if any."""

    def __init__(self):
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
        self.sets: dict[str, set[str]] = {}
        self.order: dict[str, int] = {}

    def add(self, key: str, grams: set[str]) -> None:
        self.lsh.insert(key, minhash(grams))
        self.sets[key] = grams
        self.order[key] = len(self.order)

    def match(self, grams: set[str]) -> tuple[str, float] | None:
        """The earliest indexed record whose exact Jaccard with `grams` reaches the threshold, and that Jaccard."""
        candidates = sorted(self.lsh.query(minhash(grams)), key=self.order.__getitem__)
        scored = ((key, jaccard(grams, self.sets[key])) for key in candidates)
        return next(((key, score) for key, score in scored if score >= NEAR_THRESHOLD), None)


def minhash(grams: set[str]):
    """The MinHash signature of a shingle set (datasketch, seeded, so runs agree)."""
    from datasketch import MinHash

    signature = MinHash(num_perm=NUM_PERM, seed=1)
    signature.update_batch([gram.encode("utf-8") for gram in sorted(grams)])
    return signature


def find_duplicates(records: list[tuple[str, dict]], held_out: list[tuple[str, dict]]) -> list[Finding]:
    """Every training record that repeats an earlier one or an eval record, in order (see the module docstring).

    Each record is checked in this order: exact duplicate of a kept training record, exact or near duplicate of
    an eval record, near duplicate of a kept training record; only records found to be none of these are kept
    and compared against later ones.

    Example: records [a: "Hi", b: "Hi", c: "Bye"], held_out [v: "Bye"]
        -> [Finding("exact duplicate", "b", "a", 1.0), Finding("exact eval overlap", "c", "v", 1.0)]
    """
    eval_texts = {dedup_text(record): where for where, record in reversed(held_out)}
    eval_index, train_index, seen, findings = NearIndex(), NearIndex(), {}, []
    for where, record in held_out:
        eval_index.add(where, shingles(dedup_text(record)))
    for where, record in records:
        text = dedup_text(record)
        grams = shingles(text)
        finding = check_record(where, text, grams, seen, eval_texts, eval_index, train_index)
        if finding:
            findings.append(finding)
            continue
        seen.setdefault(text, where)
        train_index.add(where, grams)
    return findings


def check_record(where: str, text: str, grams: set[str], seen: dict[str, str], eval_texts: dict[str, str],
                 eval_index: NearIndex, train_index: NearIndex) -> Finding | None:
    """The first kind of repetition one training record shows, or None."""
    if text in seen:
        return Finding(EXACT, where, seen[text], 1.0)
    if text in eval_texts:
        return Finding(EVAL_EXACT, where, eval_texts[text], 1.0)
    for index, kind in ((eval_index, EVAL_NEAR), (train_index, NEAR)):
        match = index.match(grams)
        if match:
            return Finding(kind, where, match[0], round(match[1], 3))
    return None


def deduplicate(records: list[tuple[str, dict]], held_out: list[tuple[str, dict]], mode: str,
                stats) -> list[tuple[str, dict]]:
    """Report duplicates and eval overlap in `stats.dedup`, and return the records `mode` keeps.

    Args:
        records: (where, canonical record) of one training source.
        held_out: (where, canonical record) of the eval set, or [] to skip the overlap check.
        mode: `data.dedup` (none, exact, near).
        stats: the split's `SplitStats`; removed records are dropped under their kind.

    Returns:
        The records kept, in order.
    """
    findings = find_duplicates(records, held_out)
    removed = {finding.where for finding in findings if finding.kind in REMOVED_BY[mode]}
    for finding in findings:
        if finding.where in removed:
            stats.drop(finding.kind)
    stats.dedup = merge_reports(stats.dedup, report(findings, mode, removed, bool(held_out)))
    return [(where, record) for where, record in records if where not in removed]


def report(findings: list[Finding], mode: str, removed: set[str], checked_eval: bool) -> dict:
    """The JSON-ready report: per kind, how many were found and removed, and a few examples of each kind."""
    kinds = (EXACT, NEAR, EVAL_EXACT, EVAL_NEAR)
    counts = {kind: sum(finding.kind == kind for finding in findings) for kind in kinds}
    gone = {kind: sum(finding.kind == kind and finding.where in removed for finding in findings) for kind in kinds}
    examples = [dataclasses.asdict(finding) for kind in kinds
                for finding in [f for f in findings if f.kind == kind][:EXAMPLES_KEPT]]
    return {"mode": mode, "threshold": NEAR_THRESHOLD, "counts": counts, "removed": gone,
            "eval_checked": checked_eval, "examples": examples}


def merge_reports(first: dict, second: dict) -> dict:
    """Two sources' reports as one (counts summed, examples joined); an empty report is no report."""
    if not first or not second:
        return first or second
    return first | {
        "counts": {kind: count + second["counts"][kind] for kind, count in first["counts"].items()},
        "removed": {kind: count + second["removed"][kind] for kind, count in first["removed"].items()},
        "eval_checked": first["eval_checked"] or second["eval_checked"],
        "examples": first["examples"] + second["examples"],
    }


def eval_overlap(dedup: dict) -> int:
    """How many training records overlap the eval set (exactly or nearly), removed or not."""
    return dedup["counts"][EVAL_EXACT] + dedup["counts"][EVAL_NEAR] if dedup else 0


def overlap_warning(dedup: dict, eval_path: str | None) -> str | None:
    """The loud line a run prints at its start when training data overlaps its eval set, or None.

    Example: "WARNING: 2 training example(s) overlap the eval set val.jsonl (1 exact, 1 near; 0 removed by
    data.dedup=none): eval loss on them measures memorisation. First: train.jsonl:7 ~ val.jsonl:3 (Jaccard 1)"
    """
    overlapping = eval_overlap(dedup)
    if not overlapping:
        return None
    first = next(example for example in dedup["examples"] if example["kind"] in (EVAL_EXACT, EVAL_NEAR))
    removed = dedup["removed"][EVAL_EXACT] + dedup["removed"][EVAL_NEAR]
    return (f"WARNING: {overlapping} training example(s) overlap the eval set {eval_path} "
            f"({dedup['counts'][EVAL_EXACT]} exact, {dedup['counts'][EVAL_NEAR]} near; {removed} removed by "
            f"data.dedup={dedup['mode']}): eval loss on them measures memorisation. First: {first['where']} ~ "
            f"{first['other']} (Jaccard {first['similarity']:g})")


def held_out_records(cfg: DataCfg) -> list[tuple[str, dict]]:
    """(where, canonical record) of `cfg.eval_path`, skipping records that do not fit its format."""
    records = read_source(cfg.eval_path)
    fmt = resolve_format(records, cfg.eval_path, cfg.format)
    kept = []
    for where, record in records:
        try:
            kept.append((where, to_canonical(record, fmt, where, cfg.roles)))
        except RecordError:
            continue  # counted when the eval split itself is built
    return kept
