"""Pack several tokenized examples into each row, with no attention across them.

Rows are filled best-fit-decreasing (each example, longest first, goes into the fullest row it still fits).
Each packed document keeps its own positions (restarting at 0) and, so that nothing leaks between documents,
the label of its first token is ignored: it would otherwise be predicted from the previous document.

Isolation depends on the attention kernel. On transformers 5, `sdpa` and `eager` ignore position restarts, so
they need a block-diagonal causal 4D mask: bool for `sdpa`, additive float for `eager` (eager adds the mask
to the scores, so a bool mask would be silently wrong). `flash_attention_2` finds document boundaries from
the restarting `position_ids` and takes no mask.
"""

import bisect
import heapq
from dataclasses import dataclass

import numpy as np
import torch

from ftune.data.mask import IGNORE_INDEX


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing of examples (each at most `max_length` tokens) into rows, as Python lists.

    Example, max_length=5, examples of lengths 3, 2, 4 (ids shown as letters):
        [abc], [de], [fghi] -> rows [fghi], [abcde]
        labels of row [abcde]: a's and d's labels are -100 (first tokens of their documents)
        position_ids [0, 1, 2, 0, 1], seq_lens [3, 2]

    Returns:
        Rows as dicts with `input_ids`, `labels`, `position_ids` and `seq_lens` (document lengths in order).
    """
    members, row_sizes = pack_plan(np.array([len(e["input_ids"]) for e in examples]), max_length)
    ordered = [examples[i] for i in members]
    packed = pack_documents(np.concatenate([e["input_ids"] for e in ordered]),
                            np.concatenate([e["labels"] for e in ordered]),
                            np.array([len(e["input_ids"]) for e in ordered]), row_sizes)
    rows = []
    for row in range(len(row_sizes)):
        tokens = slice(packed.row_offsets[row], packed.row_offsets[row + 1])
        docs = slice(packed.doc_offsets[row], packed.doc_offsets[row + 1])
        rows.append({"input_ids": packed.ids[tokens].tolist(), "labels": packed.labels[tokens].tolist(),
                     "position_ids": packed.positions[tokens].tolist(),
                     "seq_lens": packed.doc_lengths[docs].tolist()})
    return rows


def pack_plan(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Which documents go into which row, best-fit-decreasing, from their lengths alone.

    Each document, longest first (ties in input order), goes into the row with the least free space that
    still holds it (ties: the oldest row), else into a new row. Rows are kept in buckets by free space, and
    only the distinct free-space values are searched (at most `max_length` of them), so a million documents
    pack in seconds where a sorted list of every row would be searched and shifted once per document.

    Example, lengths [3, 2, 4], max_length 5 -> members [2, 0, 1], row_sizes [1, 2] (rows [4], [3, 2])

    Returns:
        The document indices row by row (in the order each row was filled) and the number of documents
        in each row.
    """
    order = np.argsort(-np.asarray(lengths), kind="stable")
    levels: list[int] = []  # the distinct free spaces that some row has, sorted
    rows_with: dict[int, list[int]] = {}  # free space -> heap of the rows that have it
    row_of = np.empty(len(order), dtype=np.int64)
    rows = 0
    for index, length in _pairs(order, np.asarray(lengths)[order]):
        at = bisect.bisect_left(levels, length)
        if at == len(levels):
            row, space = rows, max_length - length
            rows += 1
        else:
            space = levels[at] - length
            row = _take_row(levels, rows_with, at)
        row_of[index] = row
        if space not in rows_with:
            bisect.insort(levels, space)
            rows_with[space] = []
        heapq.heappush(rows_with[space], row)
    filled = order[np.argsort(row_of[order], kind="stable")]
    return filled, np.bincount(row_of, minlength=rows)


def _pairs(first: np.ndarray, second: np.ndarray, chunk: int = 65536):
    """Zip two arrays as Python ints, a chunk at a time (whole lists of a million ints would cost ~70 MB)."""
    for start in range(0, len(first), chunk):
        yield from zip(first[start : start + chunk].tolist(), second[start : start + chunk].tolist(), strict=True)


def _take_row(levels: list[int], rows_with: dict[int, list[int]], at: int) -> int:
    """Remove and return the oldest row with free space `levels[at]` (the level goes when no row has it)."""
    space = levels[at]
    row = heapq.heappop(rows_with[space])
    if not rows_with[space]:
        del rows_with[space]
        levels.pop(at)
    return row


@dataclass
class PackedRows:
    """Packed rows as flat arrays (the form Arrow list columns take).

    Row r holds tokens `row_offsets[r]:row_offsets[r+1]` and documents `doc_offsets[r]:doc_offsets[r+1]` of
    `doc_lengths`.
    """

    ids: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    row_offsets: np.ndarray
    doc_lengths: np.ndarray
    doc_offsets: np.ndarray


def pack_documents(ids: np.ndarray, labels: np.ndarray, doc_lengths: np.ndarray, row_sizes: np.ndarray) -> PackedRows:
    """Rows from documents laid end to end in row order (`ids`, `labels` flat; `row_sizes` documents per row).

    Each document's first label becomes -100 (it would be predicted from the previous document) and its
    positions restart at 0. See `pack` for an example.
    """
    starts = np.cumsum(doc_lengths) - doc_lengths
    labels = np.array(labels)
    labels[starts] = IGNORE_INDEX
    positions = np.arange(len(ids)) - np.repeat(starts, doc_lengths)
    doc_offsets = np.concatenate([[0], np.cumsum(row_sizes)])
    row_offsets = np.concatenate([[0], np.cumsum(doc_lengths)])[doc_offsets]
    return PackedRows(np.asarray(ids), labels, positions, row_offsets, np.asarray(doc_lengths), doc_offsets)


def block_causal_mask(seq_lens: list[list[int]], width: int, dtype: torch.dtype | None) -> torch.Tensor:
    """A (batch, 1, width, width) mask letting each token see only earlier tokens of its own document.

    Padding after the documents attends only to itself, so no softmax row is empty (which would give NaN).
    With `dtype=None` the mask is bool (True = attend); otherwise additive: 0 to attend, the dtype's
    minimum to block.

    Example, seq_lens [[2, 1]], width 4 (1 = attend):
        [[1, 0, 0, 0],
         [1, 1, 0, 0],
         [0, 0, 1, 0],
         [0, 0, 0, 1]]   <- the padding position
    """
    document = torch.full((len(seq_lens), width), -1, dtype=torch.long)
    for row, lengths in enumerate(seq_lens):
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        document[row, : len(ids)] = ids
    pads = document < 0
    document[pads] = -2 - torch.nonzero(pads)[:, 1]  # each pad position is a document of its own
    same = document.unsqueeze(2) == document.unsqueeze(1)
    return attention_mask((same & torch.ones(width, width, dtype=torch.bool).tril()).unsqueeze(1), dtype)


def attention_mask(allowed: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`allowed` (bool, True = attend) as the 4D mask an attention kernel takes.

    Itself for sdpa (`dtype` None); for eager attention additive in `dtype`: 0 to attend, the dtype's minimum to
    block.
    """
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
