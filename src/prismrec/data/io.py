"""Careful readers for tabular files: every failure names the file and, where it can, the line."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from prismrec.data.errors import DataError


def read_csv_checked(
    path: Path,
    required: Sequence[str],
    *,
    optional: Sequence[str] = (),
    numeric: Sequence[str] = (),
    integer: Sequence[str] = (),
) -> pd.DataFrame:
    """Read a UTF-8 CSV, check its columns and the numeric ones, or raise :class:`DataError`.

    All columns are read as text first so that a non-numeric id is reported with its line number
    instead of silently turning a column into floats or objects.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("file not found", path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read file: {exc.strerror or exc}", path) from exc
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        bad = raw[exc.start:exc.start + 1]
        raise DataError(f"not valid UTF-8 text (byte {exc.start}: {bad!r})", path, line) from exc
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty (no header row)", path, 1) from exc
    except (pd.errors.ParserError, csv.Error) as exc:
        raise DataError(f"malformed CSV: {exc}", path) from exc
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataError(
            f"missing column(s) {', '.join(missing)}; found {', '.join(frame.columns) or '(none)'}", path, 1
        )
    keep = [c for c in [*required, *optional] if c in frame.columns]
    frame = frame[keep]
    for column in [*numeric, *integer]:
        values = pd.to_numeric(frame[column].str.strip(), errors="coerce")
        bad = values.isna()
        if column in integer:
            bad |= values.notna() & (values != values.round())
        if bad.any():
            row = int(bad.to_numpy().nonzero()[0][0])
            value = frame[column].iloc[row]
            kind = "an integer" if column in integer else "a number"
            # +2: one for the header line, one because lines count from 1.
            raise DataError(f"column {column!r} must be {kind}, got {value!r}", path, row + 2)
        frame[column] = values.astype("int64") if column in integer else values.astype("float64")
    return frame
