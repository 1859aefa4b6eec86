"""Batch scoring: ``prismrec recommend OUT_DIR --users users.csv --out recs.parquet``.

Input CSV: a ``user`` column (external user ids known to the export; their full recorded history is
used) and optionally a ``history`` column (space-separated external item ids, oldest first) which, when
filled, is used instead, so users unknown to the export can be scored too. The file is read in chunks,
scored in batches and written as it goes (CSV or Parquet, chosen by the output suffix; columns ``user``,
``rank``, ``item``, ``score``), so memory stays flat for any number of users. The output is written under
a temporary name and renamed when complete. Every problem names the file and the line.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from prismrec.data.errors import DataError
from prismrec.serving.export import Export

OUTPUT_SCHEMA = pa.schema([("user", pa.string()), ("rank", pa.int32()), ("item", pa.string()),
                           ("score", pa.float32())])


@dataclass
class BatchReport:
    users: int
    rows: int
    skipped: list[str]
    out: Path


def _rows(path: Path, chunk_size: int) -> Iterator[tuple[int, str, str | None]]:
    """(line number, user, history or None) per data row; the header is line 1."""
    try:
        reader = pd.read_csv(path, dtype=str, keep_default_na=False, chunksize=chunk_size)
        line = 1
        for chunk in reader:
            if "user" not in chunk.columns:
                raise DataError(f"needs a 'user' column (found: {', '.join(chunk.columns)})", path, 1)
            histories = chunk["history"] if "history" in chunk.columns else [None] * len(chunk)
            for user, history in zip(chunk["user"], histories, strict=True):
                line += 1
                yield line, str(user).strip(), (history.strip() or None) if isinstance(history, str) else None
    except FileNotFoundError:
        raise DataError("file not found", path) from None
    except UnicodeDecodeError as exc:
        raise DataError(f"not valid UTF-8 text: {exc.reason}", path) from None
    except pd.errors.ParserError as exc:
        raise DataError(f"not a valid CSV file: {exc}", path) from None


def _count_rows(path: Path) -> int:
    with path.open("rb") as handle:
        return max(sum(1 for _ in handle) - 1, 0)


class _Writer:
    def __init__(self, out: Path) -> None:
        self.out = out
        self.tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        self.parquet = out.suffix.lower() == ".parquet"
        self._pq: pq.ParquetWriter | None = None
        self._first = True

    def write(self, frame: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(frame, schema=OUTPUT_SCHEMA, preserve_index=False)
        if self.parquet:
            if self._pq is None:
                self._pq = pq.ParquetWriter(self.tmp, OUTPUT_SCHEMA)
            self._pq.write_table(table)
        else:
            frame.to_csv(self.tmp, mode="w" if self._first else "a", header=self._first, index=False)
        self._first = False

    def close(self) -> None:
        if self._pq is not None:
            self._pq.close()
        elif self._first:
            pd.DataFrame(columns=OUTPUT_SCHEMA.names).to_csv(self.tmp, index=False)
        os.replace(self.tmp, self.out)

    def abort(self) -> None:
        if self._pq is not None:
            self._pq.close()
        self.tmp.unlink(missing_ok=True)


def recommend_file(export: Export, users_csv: Path, out: Path, k: int = 10, exclude_seen: bool = True,
                   batch_size: int = 256, skip_unknown: bool = False, quiet: bool = False) -> BatchReport:
    users_csv, out = Path(users_csv), Path(out)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise DataError("output must end in .csv or .parquet", out)
    if k < 1:
        raise ValueError("k must be at least 1")
    total = _count_rows(users_csv) if users_csv.exists() else 0
    writer = _Writer(out)
    skipped: list[str] = []
    n_users = n_rows = 0
    progress = Progress(TextColumn("[bold]recommend"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        disable=quiet)
    batch_users: list[str] = []
    batch_histories: list[np.ndarray] = []

    def flush() -> None:
        nonlocal n_rows
        if not batch_users:
            return
        tops = export.ranker.top_k(batch_histories, k, exclude_seen)
        frame = pd.DataFrame({
            "user": np.repeat(batch_users, [len(t.items) for t in tops]),
            "rank": np.concatenate([np.arange(1, len(t.items) + 1, dtype=np.int32) for t in tops]),
            "item": [export.external(int(i)) for t in tops for i in t.items],
            "score": np.concatenate([t.scores for t in tops]).astype(np.float32),
        })
        writer.write(frame)
        n_rows += len(frame)
        progress.advance(task, len(batch_users))
        batch_users.clear()
        batch_histories.clear()

    try:
        with progress:
            task = progress.add_task("recommend", total=total)
            for line, user, history_text in _rows(users_csv, chunk_size=max(batch_size * 8, 1024)):
                if history_text is not None:
                    ids = history_text.split()
                    known = [export.item_index[i] for i in ids if i in export.item_index]
                    if not known:
                        problem = f"none of the {len(ids)} history item id(s) of user {user!r} is known"
                        if not skip_unknown:
                            raise DataError(problem + " (use --skip-unknown to skip such rows)", users_csv, line)
                        skipped.append(f"line {line}: {problem}")
                        continue
                    history = np.array(known, dtype=np.int64)
                elif user in export.user_index:
                    history = export.histories[export.user_index[user]]
                else:
                    problem = f"unknown user id {user!r} and no history column value"
                    if not skip_unknown:
                        raise DataError(problem + " (use --skip-unknown to skip such rows)", users_csv, line)
                    skipped.append(f"line {line}: {problem}")
                    continue
                batch_users.append(user)
                batch_histories.append(history)
                n_users += 1
                if len(batch_users) >= batch_size:
                    flush()
            flush()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return BatchReport(n_users, n_rows, skipped, out)
