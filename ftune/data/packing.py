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

import torch

from ftune.data.mask import IGNORE_INDEX


def pack(examples: list[dict], max_length: int) -> list[dict]:
    """Best-fit-decreasing packing of examples (each at most `max_length` tokens) into rows.

    Example, max_length=5, examples of lengths 3, 2, 4 (ids shown as letters):
        [abc], [de], [fghi] -> rows [fghi], [abcde]
        labels of row [abcde]: a's and d's labels are -100 (first tokens of their documents)
        position_ids [0, 1, 2, 0, 1], seq_lens [3, 2]

    Returns:
        Rows as dicts with `input_ids`, `labels`, `position_ids` and `seq_lens` (document lengths in order).
    """
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]), reverse=True)
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (free space, row index), sorted: the best fit is the first with room
    for index in order:
        length = len(examples[index]["input_ids"])
        slot = bisect.bisect_left(free, (length, -1))
        if slot == len(free):
            rows.append([index])
            bisect.insort(free, (max_length - length, len(rows) - 1))
            continue
        space, row = free.pop(slot)
        rows[row].append(index)
        bisect.insort(free, (space - length, row))
    return [concatenate([examples[i] for i in members]) for members in rows]


def concatenate(documents: list[dict]) -> dict:
    """One packed row from its documents (see `pack`)."""
    row = {"input_ids": [], "labels": [], "position_ids": [], "seq_lens": []}
    for doc in documents:
        n = len(doc["input_ids"])
        row["input_ids"] += doc["input_ids"]
        row["labels"] += [IGNORE_INDEX] + doc["labels"][1:]
        row["position_ids"] += list(range(n))
        row["seq_lens"].append(n)
    return row


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
    allowed = (same & torch.ones(width, width, dtype=torch.bool).tril()).unsqueeze(1)
    if dtype is None:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
