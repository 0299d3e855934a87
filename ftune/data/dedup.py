"""Duplicates within a training source, and training examples that overlap the eval set.

Found on canonical records, before they are counted or written, over each conversation's text without its
system turn (roles, contents, reasoning, tool calls; a `text` record's text), lowercased with whitespace
collapsed. The system turn and the tool schemas are left out because many datasets share one long system
prompt by design: kept in, they would make any two short conversations look alike.

- exact duplicate: the same text as an earlier training record;
- near duplicate: Jaccard similarity >= `NEAR_THRESHOLD` (0.8) between the sets of character 5-grams
  (`SHINGLE`) of the two texts. Candidates come from MinHash LSH (datasketch: 128 permutations), and each is
  confirmed with the exact Jaccard of the two sets, so no pair below the threshold is reported;
- eval overlap: a training record that is an exact or near duplicate of a record of `data.eval_path`.

Records are checked in source order as the tokenizing workers return them (`DuplicateFinder`); the workers
compute each record's `Sketch`. With `data.dedup` none or exact, near duplicates are searched among the first
NEAR_SEARCH_LIMIT records of a source only, and the report says how many were searched.

The first record of a group is kept; later ones are reported. `data.dedup` says what is removed: `none`
(report only), `exact` (exact duplicates and exact eval overlaps) or `near` (all of them). Removed records count
as dropped under their kind, so `read = kept + dropped` still holds. Only training data is checked: the eval
set is what overlap is measured against, and mixed sources are each checked on their own.
"""

import array
import dataclasses
import functools
import hashlib
from dataclasses import dataclass, field

import numpy as np

from ftune.config.schema import DataCfg
from ftune.data.formats import RecordError, read_records, resolve_format, to_canonical

NEAR_THRESHOLD = 0.8
SHINGLE = 5
NUM_PERM = 128
EXAMPLES_KEPT = 3
"""Examples of each kind kept for the report."""

NEAR_SEARCH_LIMIT = 20_000
"""With `data.dedup` none or exact, near duplicates are searched among the first this many records of a source
only: the index holds each record's 5-gram set (~8 bytes a 5-gram), which for a million records would not fit
the memory budget of a streaming build. `data.dedup=near` searches every record (and needs that memory)."""

FIBONACCI = 0x9E3779B97F4A7C15
"""2^64 / golden ratio, odd: multiplying by it spreads a hash's bits into its high half."""

POLY_BASE = 0x100000001B3
"""Multiplier of the polynomial hash of 5 code points (the 64-bit FNV prime; odd, so no bits are lost)."""

EXACT, NEAR, EVAL_EXACT, EVAL_NEAR = "exact duplicate", "near duplicate", "exact eval overlap", "near eval overlap"
"""Kinds of finding; each is also the reason its removed records are counted under."""
KINDS = (EXACT, NEAR, EVAL_EXACT, EVAL_NEAR)

REMOVED_BY = {"none": (), "exact": (EXACT, EVAL_EXACT), "near": (EXACT, NEAR, EVAL_EXACT, EVAL_NEAR)}
"""`data.dedup` -> the kinds it removes."""


@dataclass
class Finding:
    """A training record that repeats another: which kind, where it is, what it repeats and how closely."""

    kind: str
    where: str
    other: str
    similarity: float


@dataclass
class Sketch:
    """What duplicate search needs of one record: a hash of its text, and for the near search more.

    The near search needs its 5-gram set (`shingles`) and MinHash signature. Computed in the tokenizing
    workers; small enough to send back.
    """

    key: int
    shingles: np.ndarray | None = None
    signature: np.ndarray | None = None

    @functools.cached_property
    def lsh_minhash(self):
        """The signature as datasketch's MinHash, built once per record.

        It is looked up in the eval and the training index and then inserted; building one costs as much as a lookup.
        """
        return minhash(self.signature)


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


def sketch(record: dict, near: bool) -> Sketch:
    """A record's `Sketch`; the 5-gram set and signature only with `near`."""
    text = dedup_text(record)
    key = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest())
    if not near:
        return Sketch(key)
    grams = shingles(text)
    return Sketch(key, grams, signature(grams))


def shingles(text: str) -> np.ndarray:
    """The set of a text's character 5-grams (the text itself when shorter), as sorted distinct 64-bit hashes.

    Each 5-gram is hashed from its code points with numpy, not as a string through datasketch's per-item sha1
    (which took ~3 ms a conversation, most of a build's time). Equal 5-grams get equal hashes, so Jaccard over
    these sets is Jaccard over the 5-grams (up to 64-bit collisions).

    Example: "abcdef" -> 2 hashes (of "abcde" and "bcdef"); "abc" -> 1
    """
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    count = max(1, len(points) - SHINGLE + 1)
    hashes = np.zeros(count, dtype=np.uint64)
    for offset in range(min(SHINGLE, len(points))):
        hashes = hashes * np.uint64(POLY_BASE) + points[offset : offset + count]
    return np.unique(hashes)


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """|a & b| / |a | b| of two sets of sorted distinct hashes: [1, 2] and [1, 3] -> 1/3."""
    common = len(np.intersect1d(a, b, assume_unique=True))
    return common / (len(a) + len(b) - common) if len(a) or len(b) else 1.0


@functools.cache
def permutations() -> np.ndarray:
    """Datasketch's seeded affine32 permutation parameters (a, b), drawn once per process."""
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, seed=1, scheme="affine32").permutations


def signature(grams: np.ndarray) -> np.ndarray:
    """The MinHash signature of a 5-gram set, all permutations at once in numpy.

    For each of datasketch's 32-bit affine permutations (a, b): the least `a * h + b` over the set's hashes h,
    in wrapping uint32 arithmetic as datasketch's affine32 scheme computes it (its `update_batch` makes a
    Python call per 5-gram).

    Each 64-bit 5-gram hash is mixed to 32 bits first (Fibonacci hashing: the high half of h * 2^64/phi).
    """
    mixed = ((grams * np.uint64(FIBONACCI)) >> np.uint64(32)).astype(np.uint32)
    a, b = permutations()
    return (mixed[:, None] * a[None, :] + b[None, :]).min(axis=0)


def minhash(values: np.ndarray):
    """A datasketch MinHash holding a known signature, for its LSH index."""
    from datasketch import MinHash

    return MinHash(num_perm=NUM_PERM, seed=1, hashvalues=values, permutations=permutations(), scheme="affine32")


class NearIndex:
    """Records' 5-gram sets in a MinHash LSH index; `match` returns the first near duplicate of a record, if any."""

    def __init__(self):
        from datasketch import MinHashLSH

        self.lsh = MinHashLSH(threshold=NEAR_THRESHOLD, num_perm=NUM_PERM)
        self.sets: dict[str, np.ndarray] = {}
        self.order: dict[str, int] = {}

    def add(self, key: str, record: Sketch) -> None:
        self.lsh.insert(key, record.lsh_minhash)
        self.sets[key] = record.shingles
        self.order[key] = len(self.order)

    def match(self, record: Sketch) -> tuple[str, float] | None:
        """The earliest indexed record whose exact Jaccard with `record` reaches the threshold, and that Jaccard."""
        if not self.sets:  # e.g. the eval index without data.eval_path: a lookup would still hash every band
            return None
        candidates = sorted(self.lsh.query(record.lsh_minhash), key=self.order.__getitem__)
        scored = ((key, jaccard(record.shingles, self.sets[key])) for key in candidates)
        return next(((key, score) for key, score in scored if score >= NEAR_THRESHOLD), None)


class Wheres:
    """Record locations, compactly: each as its text after the first one's source part, in one bytearray.

    Example: "data.jsonl:1", "data.jsonl:7" are kept as "1", "7" after the prefix "data.jsonl:" (a million
    locations take ~10 MB instead of ~100 MB as Python strings).
    """

    def __init__(self):
        self.prefix: str | None = None
        self.text = bytearray()
        self.ends = array.array("q")

    def add(self, where: str) -> int:
        """Store a location; returns its position."""
        if self.prefix is None:
            self.prefix = where.rstrip("0123456789]")
        tail = where.removeprefix(self.prefix) if where.startswith(self.prefix) else "\0" + where
        self.text += tail.encode("utf-8")
        self.ends.append(len(self.text))
        return len(self.ends) - 1

    def __getitem__(self, position: int) -> str:
        start = self.ends[position - 1] if position else 0
        tail = self.text[start : self.ends[position]].decode("utf-8")
        return tail[1:] if tail.startswith("\0") else self.prefix + tail


@dataclass
class DuplicateFinder:
    """Checks the records of one training source in order against the kept ones and the eval set.

    Each record is checked in this order: exact duplicate of a kept training record, exact or near duplicate of
    an eval record, near duplicate of a kept training record; only records found to be none of these are kept
    and compared against later ones. Near checks need the record's sketch with its 5-gram set.
    """

    held_out: list[tuple[str, dict]]
    seen: dict[int, int] = field(default_factory=dict)
    """Text hash of each kept record -> its position in `wheres` (ints, not strings: a million records)."""
    wheres: Wheres = field(default_factory=Wheres)
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    examples: list[Finding] = field(default_factory=list)
    """The first EXAMPLES_KEPT findings of each kind (the report shows no more)."""
    checked: int = 0
    near_searched: int = 0

    def __post_init__(self):
        self.eval_keys, self.eval_index, self.train_index = {}, NearIndex(), NearIndex()
        for where, record in reversed(self.held_out):
            self.eval_keys[sketch(record, near=False).key] = where
        for where, record in self.held_out:
            self.eval_index.add(where, sketch(record, near=True))

    def check(self, where: str, record: Sketch) -> Finding | None:
        """The first kind of repetition the record shows (counted), or None (it is kept)."""
        self.checked += 1
        finding = self._find(where, record)
        if finding:
            self.counts[finding.kind] += 1
            if self.counts[finding.kind] <= EXAMPLES_KEPT:
                self.examples.append(finding)
            return finding
        self.seen.setdefault(record.key, self.wheres.add(where))
        if record.shingles is not None:
            self.train_index.add(where, record)
        return None

    def _find(self, where: str, record: Sketch) -> Finding | None:
        if record.key in self.seen:
            return Finding(EXACT, where, self.wheres[self.seen[record.key]], 1.0)
        if record.key in self.eval_keys:
            return Finding(EVAL_EXACT, where, self.eval_keys[record.key], 1.0)
        if record.shingles is None:
            return None
        self.near_searched += 1
        for index, kind in ((self.eval_index, EVAL_NEAR), (self.train_index, NEAR)):
            match = index.match(record)
            if match:
                return Finding(kind, where, match[0], round(match[1], 3))
        return None


def report(finder: DuplicateFinder, mode: str) -> dict:
    """The JSON-ready report: per kind, how many were found and removed (`mode`), and a few examples.

    Also how many records were checked, and how many of them the near search covered.
    """
    counts = dict(finder.counts)
    gone = {kind: counts[kind] if kind in REMOVED_BY[mode] else 0 for kind in KINDS}
    examples = [dataclasses.asdict(finding) for kind in KINDS for finding in finder.examples if finding.kind == kind]
    return {"mode": mode, "threshold": NEAR_THRESHOLD, "counts": counts, "removed": gone,
            "eval_checked": bool(finder.held_out), "examples": examples, "records": finder.checked,
            "near_searched": finder.near_searched}


def merge_reports(first: dict, second: dict) -> dict:
    """Two sources' reports as one (counts summed, examples joined); an empty report is no report."""
    if not first or not second:
        return first or second
    return first | {
        "counts": {kind: count + second["counts"][kind] for kind, count in first["counts"].items()},
        "removed": {kind: count + second["removed"][kind] for kind, count in first["removed"].items()},
        "records": first["records"] + second["records"],
        "near_searched": first["near_searched"] + second["near_searched"],
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
    records = list(read_records(cfg.eval_path, cfg))
    fmt = resolve_format(records, cfg.eval_path, cfg.format)
    kept = []
    for where, record in records:
        try:
            kept.append((where, to_canonical(record, fmt, where, cfg.roles)))
        except RecordError:
            continue  # counted when the eval split itself is built
    return kept
