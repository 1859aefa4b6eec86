"""Streaming readers for the JSON-lines dumps (Amazon Reviews, Yelp) and the load reports they fill.

The public dumps are large (tens of millions of lines), so nothing here reads a file as one string:
``JsonLinesReader`` decompresses (gzip is detected by its magic bytes, whatever the file is called) and
parses one line at a time, and ``InteractionColumns`` keeps the interactions as interned integer codes,
so peak memory is the final table plus 16 bytes a row and one copy of each distinct id.

Bad input: a malformed line (bad JSON, not an object, a missing or mistyped field) is reported with
file and line. ``on_bad_line="stop"`` (the default) raises :class:`DataError`; ``"skip"`` drops the line,
counts it in the :class:`ReadReport` and keeps going. A truncated or corrupt gzip stream always stops:
what is missing cannot be skipped.
"""

from __future__ import annotations

import ast
import gzip
import json
import logging
import sys
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from prismrec.data.errors import DataError

log = logging.getLogger("prismrec.data")

BadLinePolicy = Literal["stop", "skip"]
GZIP_MAGIC = b"\x1f\x8b"
_MAX_EXAMPLES = 5
_PROGRESS_MIN_BYTES = 64 * 1024 * 1024  # smaller files read in well under a few seconds
_SKIPPED = object()  # a bad line the policy dropped
_BLANK_START = frozenset(b" \t\r\n\f\v")


class BadRecord(ValueError):
    """Raised by a loader's field extraction; the reader adds file and line and applies the policy."""


@dataclass
class ReadReport:
    """What happened while reading one file."""

    path: Path
    lines: int = 0  # non-blank lines seen
    records: int = 0  # lines that became records
    skipped: int = 0  # bad lines dropped under on_bad_line="skip"
    examples: list[str] = field(default_factory=list)  # the first few "line N: reason"

    def summary(self) -> str:
        text = f"{self.path.name}: {self.records:,} records from {self.lines:,} lines"
        if self.skipped:
            text += f", {self.skipped:,} bad lines skipped (first: {'; '.join(self.examples)})"
        return text


@dataclass
class LoadReport:
    """Everything a loader dropped or could not resolve, so a user can see nothing was lost silently."""

    files: list[ReadReport] = field(default_factory=list)
    duplicate_interactions: int = 0
    duplicate_items: int = 0
    filtered_interactions: int = 0  # dropped by a loader rule (e.g. Yelp: business is not a restaurant)
    missing_images: int = 0  # image references that point at no file (local) or are not fetched yet (URL)
    notes: list[str] = field(default_factory=list)

    @property
    def skipped_lines(self) -> int:
        return sum(f.skipped for f in self.files)

    def lines(self) -> list[str]:
        out = [f.summary() for f in self.files]
        if self.duplicate_interactions:
            out.append(f"{self.duplicate_interactions:,} duplicate interactions dropped (first kept)")
        if self.duplicate_items:
            out.append(f"{self.duplicate_items:,} duplicate catalogue rows dropped (first kept)")
        if self.filtered_interactions:
            out.append(f"{self.filtered_interactions:,} interactions dropped by the loader's rules")
        if self.missing_images:
            out.append(f"{self.missing_images:,} items whose image is missing or not fetched yet")
        return out + self.notes

    def log(self) -> None:
        for line in self.lines():
            log.info(line)
        if self.skipped_lines:
            log.warning("skipped %d bad lines: %s", self.skipped_lines,
                        "; ".join(f.summary() for f in self.files if f.skipped))


def _parse_python_literal(line: bytes) -> Any:
    # Only literals: ast.literal_eval never runs code (the 2014 Amazon files are Python dict reprs).
    return ast.literal_eval(line.decode("utf-8"))


class JsonLinesReader:
    """Iterate ``(line_number, record)`` over a JSON-lines file, plain or gzipped, one line at a time.

    ``python_literals=True`` also accepts lines that are Python dict literals (parsed with
    ``ast.literal_eval``, never ``eval``), for the 2014 Amazon release; it is off unless a user opts in.
    """

    def __init__(self, path: Path, *, on_bad_line: BadLinePolicy = "stop", python_literals: bool = False,
                 description: str | None = None, progress: bool | None = None) -> None:
        self.path = Path(path)
        self.on_bad_line = on_bad_line
        self.python_literals = python_literals
        self.description = description or self.path.name
        self.report = ReadReport(self.path)
        self._progress = progress

    def bad(self, line: int, reason: str) -> None:
        """Stop with a :class:`DataError`, or count and skip the line, per the policy."""
        if self.on_bad_line == "stop":
            hint = " (pass on_bad_line=skip to drop such lines and count them)"
            raise DataError(f"{reason}{hint}", self.path, line)
        self.report.skipped += 1
        if len(self.report.examples) < _MAX_EXAMPLES:
            self.report.examples.append(f"line {line}: {reason}")

    def _open(self) -> tuple[IO[bytes], IO[bytes]]:
        """(stream of decompressed bytes, the raw file whose position tracks progress)."""
        if not self.path.exists():
            raise DataError("file not found", self.path)
        raw = self.path.open("rb")
        if raw.read(2) == GZIP_MAGIC:
            raw.seek(0)
            return gzip.GzipFile(fileobj=raw, mode="rb"), raw
        raw.seek(0)
        return raw, raw

    def _show_progress(self) -> bool:
        if self._progress is not None:
            return self._progress
        return sys.stderr.isatty() and self.path.stat().st_size >= _PROGRESS_MIN_BYTES

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        stream, raw = self._open()
        progress: Progress | None = None
        task = None
        if self._show_progress():
            progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeRemainingColumn(), transient=True)
            task = progress.add_task(f"reading {self.description}", total=self.path.stat().st_size)
            progress.start()
        report = self.report
        loads = json.loads
        line_no = blank = 0
        bad_before = report.skipped
        try:
            for line in stream:
                line_no += 1
                if line[0] in _BLANK_START and not line.strip():  # JSON lines start with "{": cheap test first
                    blank += 1
                    continue
                if progress is not None and line_no % 65536 == 0:
                    progress.update(task, completed=raw.tell())  # type: ignore[arg-type]
                try:
                    record = loads(line)
                except (ValueError, RecursionError) as exc:
                    record = self._fallback(line, exc, line_no)
                    if record is _SKIPPED:
                        continue
                if type(record) is not dict:
                    self.bad(line_no, f"expected a JSON object, got {type(record).__name__}")
                    continue
                yield line_no, record
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise DataError(
                f"compressed stream is truncated or corrupt after line {line_no} ({exc}); "
                "the file is probably incomplete: download it again",
                self.path, line_no + 1,
            ) from exc
        except OSError as exc:
            raise DataError(f"cannot read after line {line_no}: {exc}", self.path, line_no + 1) from exc
        finally:
            # Counted here rather than per line: the loop is the hot path of every loader.
            report.lines += line_no - blank
            # Records handed out = lines minus the ones dropped as bad (the loader may drop more later).
            report.records += line_no - blank - (report.skipped - bad_before)
            if progress is not None:
                progress.stop()
            stream.close()
            raw.close()

    def _fallback(self, line: bytes, exc: Exception, line_no: int) -> Any:
        if self.python_literals:
            try:
                return _parse_python_literal(line)
            except (ValueError, SyntaxError, UnicodeDecodeError, RecursionError, MemoryError, TypeError):
                pass
        if isinstance(exc, json.JSONDecodeError):  # its own "line 1 column 5" would clash with the file line
            reason = f"malformed JSON ({exc.msg} at character {exc.pos + 1})"
        else:
            reason = f"malformed JSON ({exc})"
        if not self.python_literals and line.lstrip().startswith(b"{'"):
            reason += ("; this looks like a Python literal (the 2014 Amazon release): pass python_literals=true "
                       "to parse such lines safely with ast.literal_eval")
        self.bad(line_no, reason)
        return _SKIPPED


class InteractionColumns:
    """Interactions gathered while streaming, kept compact: ids interned once, rows as int arrays.

    Per row this holds 16 bytes (user code, item code, timestamp); each distinct id is stored once. The
    string columns are built at the end with one Arrow ``take``, so peak memory is the final table plus
    the codes and the id dictionaries, however long the file.
    """

    def __init__(self) -> None:
        self.user_codes: dict[str, int] = {}
        self.item_codes: dict[str, int] = {}
        self.users = array("i")
        self.items = array("i")
        self.timestamps = array("q")

    def add(self, user: str, item: str, timestamp: int) -> None:
        users, items = self.user_codes, self.item_codes
        self.users.append(users.setdefault(user, len(users)))
        self.items.append(items.setdefault(item, len(items)))
        self.timestamps.append(timestamp)

    def __len__(self) -> int:
        return len(self.users)

    def clear(self) -> None:
        self.user_codes, self.item_codes = {}, {}
        self.users, self.items, self.timestamps = array("i"), array("i"), array("q")

    def to_frame(self, duplicates: Literal["user_item", "exact", "keep"]) -> tuple[pd.DataFrame, int]:
        """(user/item/timestamp table in file order, number of duplicate rows dropped; first kept).

        Duplicates are found by a stable sort of integer keys (24 bytes a row while it runs) instead of a
        hash table over strings. The codes are released as soon as the string columns exist.
        """
        n = len(self)
        users = np.frombuffer(self.users, dtype=np.int32) if n else np.zeros(0, np.int32)
        items = np.frombuffer(self.items, dtype=np.int32) if n else np.zeros(0, np.int32)
        times = np.frombuffer(self.timestamps, dtype=np.int64) if n else np.zeros(0, np.int64)
        dropped = 0
        if duplicates != "keep" and n > 1:
            pair = users.astype(np.int64) * max(len(self.item_codes), 1) + items
            if duplicates == "user_item":
                order = np.argsort(pair, kind="stable")
                same = pair[order[1:]] == pair[order[:-1]]
            else:
                order = np.lexsort((times, pair))  # stable: equal keys keep file order
                same = (pair[order[1:]] == pair[order[:-1]]) & (times[order[1:]] == times[order[:-1]])
            del pair
            repeated = order[1:][same]  # every row equal to the one before it in sorted order
            del order, same
            dropped = len(repeated)
            if dropped:
                keep = np.ones(n, dtype=bool)
                keep[repeated] = False
                users, items, times = users[keep], items[keep], times[keep]
        # large_string: what pandas' Arrow-backed str columns hold, so to_pandas does not copy the strings.
        user_names = pa.array(list(self.user_codes), type=pa.large_string())
        item_names = pa.array(list(self.item_codes), type=pa.large_string())
        self.user_codes, self.item_codes = {}, {}
        user_column = pc.take(user_names, pa.array(users, type=pa.int32()))
        item_column = pc.take(item_names, pa.array(items, type=pa.int32()))
        time_column = pa.array(times, type=pa.int64())
        del users, items, times, user_names, item_names
        self.clear()  # the codes are not needed for the pandas conversion
        table = pa.table({"user": user_column, "item": item_column, "timestamp": time_column})
        del user_column, item_column, time_column
        return table.to_pandas(), dropped


def require_str(record: dict[str, Any], key: str) -> str:
    """``record[key]`` as a non-empty string, or :class:`BadRecord` saying what is wrong."""
    try:
        value = record[key]
    except KeyError:
        raise BadRecord(f"missing field {key!r}") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value:
        raise BadRecord(f"field {key!r} must be a non-empty string, got {value!r}")
    return value


def require_int(record: dict[str, Any], key: str) -> int:
    """``record[key]`` as an integer (ints, integral floats and digit strings are accepted)."""
    try:
        value = record[key]
    except KeyError:
        raise BadRecord(f"missing field {key!r}") from None
    if isinstance(value, bool):
        raise BadRecord(f"field {key!r} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise BadRecord(f"field {key!r} must be an integer, got {value!r}")
