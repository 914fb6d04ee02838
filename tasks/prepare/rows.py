"""Packed rows, in memory and on disk: the one place that writes the prepared rows and the one that reads them.

On disk the rows are `<prepared>/rows/`, in the layout Dataset.save_to_disk writes (one Arrow IPC stream file
beside datasets' state.json and dataset_info.json), with columns input_ids, labels, position_ids (int32 lists).
Tessera reads them back with pyarrow alone (read_rows), as numpy views of the memory-mapped file: the trainer,
the step plan and repacking import neither `datasets` nor pandas, and benchmarks that compare with other
trainers can still open them with datasets.load_from_disk.

Below packing and the trainer's data module, and importing neither: the training worker reads rows through it
without the tokenizing code above it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tessera.core.training import IGNORE_INDEX

COLUMNS = ("input_ids", "labels", "position_ids")
ROWS_FILE = "data-00000-of-00001.arrow"  # the shard name Dataset.save_to_disk gives a one-file dataset


@dataclass
class Rows:
    """Rows laid end to end: row k is [offsets[k], offsets[k + 1]) of each column. Prepared rows are never empty."""

    input_ids: np.ndarray
    labels: np.ndarray
    position_ids: np.ndarray
    offsets: np.ndarray

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens of each row."""
        return np.diff(self.offsets)

    @property
    def trained(self) -> np.ndarray:
        """Tokens the trainer learns from in each row: it predicts token k from token k - 1 of the same row, so a
        token counts when its label is set and it is not the row's first."""
        trained = self.labels != IGNORE_INDEX
        trained[self.offsets[:-1]] = False
        return np.add.reduceat(trained, self.offsets[:-1])

    @property
    def trainable(self) -> int:
        """Tokens the trainer learns from, in all the rows."""
        return int(self.trained.sum())

    def to_arrow(self):
        import pyarrow as pa

        offsets = pa.array(self.offsets, pa.int32())
        return pa.table({c: pa.ListArray.from_arrays(offsets, pa.array(getattr(self, c))) for c in COLUMNS})

    @classmethod
    def from_arrow(cls, batch) -> Rows:
        """A record batch of the rows file, its columns as numpy views of the batch's buffers (no copy). Viewed by
        hand because pyarrow's own conversions (Array.to_numpy, take) import pandas, ~0.3 s in every training process."""

        def int32s(array, length: int) -> np.ndarray:  # an int32 array's values, or a list array's offsets
            return np.frombuffer(array.buffers()[1], np.int32, length, array.offset * 4)

        lists = [batch.column(c) for c in COLUMNS]
        offsets = [int32s(column, len(column) + 1) for column in lists]
        values = [int32s(column.values, len(column.values))[o[0] : o[-1]] for column, o in zip(lists, offsets)]
        return cls(*values, offsets=offsets[0] - offsets[0][0])


def write_rows(rows: Iterable[Rows], out: Path, fingerprint: str) -> tuple[int, int, int]:
    """Append rows to one Arrow file as they come, in the layout Dataset.save_to_disk writes (`fingerprint` names
    its content for datasets' own caches). Returns (rows, tokens, trainable tokens)."""
    from datasets import DatasetInfo, Features, List, Value
    from datasets.arrow_writer import ArrowWriter

    features = Features({c: List(Value("int32")) for c in COLUMNS})
    out.mkdir(parents=True)
    n_rows = n_tokens = n_trainable = 0
    writer = ArrowWriter(features=features, path=str(out / ROWS_FILE))
    try:
        for r in rows:
            writer.write_table(r.to_arrow())
            n_rows, n_tokens, n_trainable = n_rows + len(r.offsets) - 1, n_tokens + len(r.input_ids), n_trainable + r.trainable
        writer.finalize()
    finally:
        writer.close()
    state = {
        "_data_files": [{"filename": ROWS_FILE}], "_fingerprint": fingerprint, "_format_columns": None,
        "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None,
    }
    (out / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))
    (out / "dataset_info.json").write_text(json.dumps(asdict(DatasetInfo(features=features)), indent=2))
    return n_rows, n_tokens, n_trainable


def read_rows(prepared_path: str | Path) -> list[Rows]:
    """The prepared rows, one Rows per record batch of the file, viewing the memory-mapped file: pages are read as
    they are touched, and nothing is copied. (datasets' ArrowWriter writes an IPC stream, not the random-access IPC
    file format.)"""
    import pyarrow as pa  # here, not at the top: the prepare stage imports this module, and a cache hit reads no rows

    return [Rows.from_arrow(batch) for batch in pa.ipc.open_stream(pa.memory_map(str(Path(prepared_path) / "rows" / ROWS_FILE)))]


def tokens_per_row(rows: list[Rows]) -> np.ndarray:
    """Real tokens of each row, in file order, from the offsets alone."""
    return np.concatenate([r.lengths for r in rows])
