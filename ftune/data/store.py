"""Tokenized examples and training rows on disk, so that memory does not grow with the number of rows.

Two forms, each for what reads it:
- While a split is built, each source's examples go to flat int32 files (`ids.bin`, `labels.bin`) with their
  lengths and learned-token counts kept as numpy arrays (8 bytes an example). Mixing and packing decide from
  those arrays alone which examples form which row; the rows are then gathered chunk by chunk from a fresh
  `np.memmap` each time, as nanoGPT re-creates its memmap, so the pages a chunk touched leave the process's
  resident memory with it; numpy's indexing of the memmap reads exactly the tokens a chunk needs.
- The finished rows are one Arrow IPC stream file (`rows.arrow`), written a chunk at a time with pyarrow and
  read back with `datasets.Dataset.from_file`: memory-mapped, indexable by the DataLoader, and the Dataset
  that `ftune data`, `ftune eval` and the tests already read. Beside it `lengths.npy` holds each row's tokens,
  for length-grouped batching and batch statistics without reading the rows.

Why not `datasets` for the whole build: `Dataset.map` needs the source in Arrow first (a copy, and a schema
that mixed chat records rarely fit), and returns rows only, not the statistics ftune reports
(`ftune.data.workers` says more).
"""

import functools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ftune.data.packing import pack_documents, pack_plan

TOKEN_DTYPE = np.int32
"""Token ids and labels on disk: vocabularies stay far below 2^31, and -100 fits."""

ROWS_FILE = "rows.arrow"
LENGTHS_FILE = "lengths.npy"
ROWS_PER_CHUNK = 8192
"""Rows gathered and written at a time: bounds the memory of the rows step."""


@dataclass
class TokenWriter:
    """Appends examples (flat ids and labels, with each example's length and learned tokens) to `directory`."""

    directory: Path
    lengths: list[np.ndarray] = field(default_factory=list)
    learned: list[np.ndarray] = field(default_factory=list)

    def __post_init__(self):
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ids_file = (self.directory / "ids.bin").open("wb")
        self.labels_file = (self.directory / "labels.bin").open("wb")

    def write(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray, learned: np.ndarray) -> None:
        self.ids_file.write(ids.astype(TOKEN_DTYPE).tobytes())
        self.labels_file.write(labels.astype(TOKEN_DTYPE).tobytes())
        self.lengths.append(lengths.astype(np.int64))
        self.learned.append(learned.astype(np.int64))

    def close(self) -> "TokenFile":
        self.ids_file.close()
        self.labels_file.close()
        return TokenFile(self.directory, np.concatenate([np.zeros(0, np.int64), *self.lengths]),
                         np.concatenate([np.zeros(0, np.int64), *self.learned]))


@dataclass
class TokenFile:
    """A source's examples as `TokenWriter` left them: example i is tokens `starts[i]:starts[i] + lengths[i]`."""

    directory: Path
    lengths: np.ndarray
    learned: np.ndarray

    @functools.cached_property
    def starts(self) -> np.ndarray:
        return np.cumsum(self.lengths) - self.lengths

    def maps(self) -> tuple[np.ndarray, np.ndarray]:
        """Fresh read-only memmaps of the ids and labels (an empty file cannot be mapped)."""
        if not self.lengths.sum():
            return np.zeros(0, TOKEN_DTYPE), np.zeros(0, TOKEN_DTYPE)
        return (np.memmap(self.directory / "ids.bin", dtype=TOKEN_DTYPE, mode="r"),
                np.memmap(self.directory / "labels.bin", dtype=TOKEN_DTYPE, mode="r"))


@dataclass
class Documents:
    """The examples a split trains on, in order: which source file each comes from and its index there."""

    files: list[TokenFile]
    source: np.ndarray
    index: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        return self.lengths_of(np.arange(len(self.source)))

    def gather(self, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The ids and labels of documents `chosen` (positions in this list) laid end to end, and their lengths."""
        lengths = self.lengths_of(chosen)
        out_starts = np.cumsum(lengths) - lengths
        ids, labels = np.empty(lengths.sum(), TOKEN_DTYPE), np.empty(lengths.sum(), TOKEN_DTYPE)
        for number, file in enumerate(self.files):
            mine = self.source[chosen] == number
            if not mine.any():
                continue
            source_ids, source_labels = file.maps()
            local = self.index[chosen][mine]
            into = token_positions(out_starts[mine], file.lengths[local])
            frm = token_positions(file.starts[local], file.lengths[local])
            ids[into], labels[into] = source_ids[frm], source_labels[frm]
            del source_ids, source_labels  # unmapped here: the pages read leave resident memory
        return ids, labels, lengths

    def lengths_of(self, chosen: np.ndarray) -> np.ndarray:
        lengths = np.empty(len(chosen), np.int64)
        for number, file in enumerate(self.files):
            mine = self.source[chosen] == number
            lengths[mine] = file.lengths[self.index[chosen][mine]]
        return lengths


def token_positions(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Every token position of spans laid end to end: starts [10, 3], lengths [2, 3] -> [10, 11, 3, 4, 5]."""
    before = np.cumsum(lengths) - lengths
    return np.repeat(starts - before, lengths) + np.arange(lengths.sum())


def write_rows(directory: Path, documents: Documents, packing_length: int | None) -> np.ndarray:
    """Write the training rows to `directory` (`rows.arrow`, `lengths.npy`); returns the tokens of each row.

    Unpacked, each document is a row; packed, rows of at most `packing_length` tokens are planned from the
    lengths (`pack_plan`) and assembled a chunk of rows at a time.
    """
    import pyarrow as pa

    lengths = documents.lengths
    if packing_length:
        members, row_sizes = pack_plan(lengths, packing_length)
    else:
        members, row_sizes = np.arange(len(lengths)), np.ones(len(lengths), np.int64)
    first_doc = np.concatenate([[0], np.cumsum(row_sizes)])
    writer = None
    with pa.OSFile(str(directory / ROWS_FILE), "wb") as sink:
        for row in range(0, len(row_sizes), ROWS_PER_CHUNK):
            sizes = row_sizes[row : row + ROWS_PER_CHUNK]
            chosen = members[first_doc[row] : first_doc[row + len(sizes)]]
            batch = rows_batch(*documents.gather(chosen), sizes, packed=bool(packing_length))
            writer = writer or pa.ipc.new_stream(sink, batch.schema)
            writer.write_batch(batch)
        writer.close()
    row_tokens = np.add.reduceat(lengths[members], first_doc[:-1]) if len(members) else np.zeros(0, np.int64)
    np.save(directory / LENGTHS_FILE, row_tokens.astype(np.int64))
    return row_tokens


def rows_batch(ids: np.ndarray, labels: np.ndarray, doc_lengths: np.ndarray, row_sizes: np.ndarray, packed: bool):
    """One Arrow record batch of rows: `input_ids`, `labels` (+ `position_ids`, `seq_lens` when packed)."""
    import pyarrow as pa

    if not packed:
        offsets = pa.array(np.concatenate([[0], np.cumsum(doc_lengths)]).astype(np.int32))
        return pa.RecordBatch.from_pydict({"input_ids": pa.ListArray.from_arrays(offsets, ids),
                                           "labels": pa.ListArray.from_arrays(offsets, labels)})
    rows = pack_documents(ids, labels, doc_lengths, row_sizes)
    offsets = pa.array(rows.row_offsets.astype(np.int32))
    return pa.RecordBatch.from_pydict({
        "input_ids": pa.ListArray.from_arrays(offsets, rows.ids),
        "labels": pa.ListArray.from_arrays(offsets, rows.labels.astype(TOKEN_DTYPE)),
        "position_ids": pa.ListArray.from_arrays(offsets, rows.positions.astype(TOKEN_DTYPE)),
        "seq_lens": pa.ListArray.from_arrays(pa.array(rows.doc_offsets.astype(np.int32)),
                                             rows.doc_lengths.astype(TOKEN_DTYPE)),
    })


class RowWriter:
    """Appends rows (dicts of token-id lists and scalars) to `directory`'s rows file as they come, with their lengths.

    For rows built whole per record (preference pairs, `ftune.data.preference`), which need no mixing or packing
    plan: each batch goes straight to the Arrow stream that `read_rows` memory-maps, its schema taken from the
    first batch written.
    """

    def __init__(self, directory: Path):
        import pyarrow as pa

        self.sink, self.writer, self.schema, self.lengths = pa.OSFile(str(directory / ROWS_FILE), "wb"), None, None, []
        self.directory = directory

    def write(self, rows: list[dict], lengths: list[int]) -> None:
        import pyarrow as pa

        if not rows:
            return
        batch = pa.RecordBatch.from_pylist(rows, schema=self.schema)
        if self.writer is None:
            self.schema, self.writer = batch.schema, pa.ipc.new_stream(self.sink, batch.schema)
        self.writer.write_batch(batch)
        self.lengths += lengths

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.sink.close()
        np.save(self.directory / LENGTHS_FILE, np.array(self.lengths, np.int64))


def read_rows(directory: Path):
    """The rows of an entry as a memory-mapped `datasets.Dataset`, and each row's tokens."""
    from datasets import Dataset

    return Dataset.from_file(str(directory / ROWS_FILE)), np.load(directory / LENGTHS_FILE)
