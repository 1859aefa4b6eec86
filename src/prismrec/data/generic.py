"""A generic catalogue format for anyone's data, and helpers the other loaders share.

Folder layout (file names are options; ``.csv`` or ``.parquet`` chosen by suffix)::

    my-shop/
      interactions.csv     user,item,timestamp        (one row per interaction; timestamp in seconds)
      items.csv            item,title,...,image       (one row per item; every other column is text)
      images/...           optional local images named by the image column

Interactions: columns ``user``, ``item``, ``timestamp`` (names are options). ``timestamp_unit`` says how
to read the timestamp: ``s`` (Unix seconds, the default), ``ms`` (Unix milliseconds) or ``iso``
(ISO 8601 text such as ``2024-05-01T12:30:00``, taken as UTC when it has no offset). Exact duplicate
rows (same user, item and timestamp) are dropped, the first kept, and counted.

Items: column ``item`` plus textual attribute columns, ``title`` first when present; by default every
other column except the image column is an attribute, in file order (or list them in
``attribute_columns``); values are cleaned like the scraped dumps (HTML tags and entities removed,
whitespace collapsed, cut at 2000 characters). Duplicate item rows: first kept, counted. The optional
image column (``image``) holds a path relative to the dataset folder (it must stay inside it) or an
http/https URL (fetched into the image cache by ``prismrec data fetch-images``); any other URL scheme
is an error.

See ``docs/datasets.md`` for a ten-line example.
"""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any, ClassVar, Literal, NamedTuple

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from prismrec.data.dataset import RawDataset
from prismrec.data.errors import DataError
from prismrec.data.images import ALLOWED_SCHEMES, ImageCache, url_scheme
from prismrec.data.io import read_csv_checked
from prismrec.data.jsonl import LoadReport
from prismrec.data.loaders import DATASETS
from prismrec.data.paths import safe_join


class PaperFilter(NamedTuple):
    """The k-core thresholds a paper applied to a dataset (passed to ``build_sequences``).

    Loaders declare theirs as the ``paper_filter`` class variable (``None``: no filter); ``prismrec data
    stats`` and ``fetch-images`` apply it unless ``--min-user-interactions``/``--min-item-interactions``
    are given.
    """

    min_user_interactions: int
    min_item_interactions: int


def paper_filter_of(loader_cls: type) -> PaperFilter:
    found = getattr(loader_cls, "paper_filter", None)
    return found if isinstance(found, PaperFilter) else PaperFilter(1, 1)


_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")
MAX_ATTRIBUTE_CHARS = 2000  # long descriptions are cut: text encoders read a few hundred tokens at most


def clean_text(value: Any, separator: str = ", ") -> str | None:
    """Plain text from a scraped field: lists joined, dicts as ``key: value``, HTML tags and entities removed."""
    if value is None:
        return None
    if isinstance(value, dict):
        parts = [f"{k}: {clean_text(v)}" for k, v in value.items() if clean_text(v)]
        value = "; ".join(parts)
    elif isinstance(value, list | tuple):
        parts = [p for p in (clean_text(v) for v in value) if p]
        value = separator.join(dict.fromkeys(parts))  # scraped lists repeat entries
    elif not isinstance(value, str):
        value = str(value)
    text = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", value))).strip()
    if len(text) > MAX_ATTRIBUTE_CHARS:
        text = text[:MAX_ATTRIBUTE_CHARS].rsplit(" ", 1)[0] + " …"
    return text or None


def resolve_images(root: Path, references: list[str | None], source: Path, lines: list[int] | None,
                   report: LoadReport, cache: ImageCache | None = None) -> tuple[list[Path | None], list[str | None]]:
    """(``image_path``, ``image_url``) per item from references that are local paths or http(s) URLs.

    Local paths go through ``safe_join`` (an escape is a ``DataError`` naming file and line) and count as
    missing when no file is there; URLs resolve to the image cache. Other schemes are refused.
    """
    cache = cache or ImageCache()
    paths: list[Path | None] = []
    urls: list[str | None] = []
    for index, reference in enumerate(references):
        line = lines[index] if lines is not None else None
        if reference is None or str(reference).strip() == "":
            paths.append(None)
            urls.append(None)
            continue
        reference = str(reference).strip()
        scheme = url_scheme(reference)
        if scheme is None:
            candidate = safe_join(root, reference, source=source, line=line)
            exists = candidate.is_file()
            paths.append(candidate if exists else None)
            urls.append(None)
            report.missing_images += not exists
        elif scheme in ALLOWED_SCHEMES:
            cached = cache.lookup(reference)
            paths.append(cached)
            urls.append(reference)
            report.missing_images += cached is None
        else:
            raise DataError(f"image {reference!r} uses the {scheme!r} scheme; only http/https URLs or paths "
                            "inside the dataset folder are allowed", source, line)
    return paths, urls


def find_file(root: Path, candidates: list[str], what: str) -> Path:
    """The first of ``candidates`` (relative to ``root``) that exists, or a DataError listing them."""
    for name in candidates:
        path = safe_join(root, name)
        if path.is_file():
            return path
    raise DataError(f"no {what} file found; looked for {', '.join(candidates)} (set the file name option "
                    "if yours is called differently)", root)


def _read_table(path: Path, required: list[str], optional: list[str], integer: list[str]) -> tuple[pd.DataFrame, int]:
    """A CSV or Parquet file as text columns (integers checked) and the line number of its first row."""
    if path.suffix.lower() in (".parquet", ".pq"):
        if not path.exists():
            raise DataError("file not found", path)
        try:
            table = pq.read_table(path)
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError...
            raise DataError(f"not a readable Parquet file: {exc}", path) from exc
        missing = [c for c in required if c not in table.column_names]
        if missing:
            raise DataError(f"missing column(s) {', '.join(missing)}; found {', '.join(table.column_names)}", path)
        frame = table.select([c for c in [*required, *optional] if c in table.column_names]).to_pandas()
        for column in frame.columns:
            if column in integer and pd.api.types.is_datetime64_any_dtype(frame[column]):
                raise DataError(f"column {column!r} holds dates/times, not numbers: use timestamp_unit=iso", path)
            if column in integer:
                values = pd.to_numeric(frame[column], errors="coerce")
                bad = values.isna() | (values != values.round())
                if bad.any():
                    row = int(np.flatnonzero(bad.to_numpy())[0])
                    raise DataError(f"column {column!r} must be an integer, got {frame[column].iloc[row]!r} "
                                    f"(row {row + 1})", path)
                frame[column] = values.astype("int64")
            else:
                frame[column] = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v)
                                 for v in frame[column]]
        return frame, 1
    frame = read_csv_checked(path, required, optional=optional, integer=integer)
    return frame, 2  # line 1 is the header


class GenericOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    interactions_file: str = Field("interactions.csv", description=".csv or .parquet, relative to the folder")
    items_file: str = Field("items.csv", description=".csv or .parquet, relative to the folder")
    user_column: str = "user"
    item_column: str = "item"
    timestamp_column: str = "timestamp"
    timestamp_unit: Literal["s", "ms", "iso"] = "s"
    item_id_column: str = Field("item", description="item id column of the items file")
    image_column: str | None = Field("image", description="local path or http/https URL; used if present")
    attribute_columns: list[str] | None = Field(None, description="default: every other items column")


@DATASETS.register("generic")
class GenericDataset:
    """Loader for the generic interactions + items format (see the module docstring)."""

    Options: ClassVar[type[BaseModel]] = GenericOptions
    folder: ClassVar[str] = "generic"
    paper_filter: ClassVar[PaperFilter | None] = None

    def __init__(self, options: GenericOptions | None = None) -> None:
        self.options = options or GenericOptions()
        self.report = LoadReport()

    def load(self, root: Path) -> RawDataset:
        opts = self.options
        root = Path(root).resolve()
        self.report = report = LoadReport()
        inter_path = safe_join(root, opts.interactions_file)
        items_path = safe_join(root, opts.items_file)

        integer = [] if opts.timestamp_unit == "iso" else [opts.timestamp_column]
        inter, first_line = _read_table(inter_path, [opts.user_column, opts.item_column, opts.timestamp_column],
                                        [], integer)
        for column in (opts.user_column, opts.item_column):
            empty = inter[column].isna() | (inter[column].astype(str).str.strip() == "")
            if empty.any():
                row = int(np.flatnonzero(empty.to_numpy())[0])
                raise DataError(f"empty {column!r}", inter_path, row + first_line)
        timestamps = self._timestamps(inter[opts.timestamp_column], inter_path, first_line)
        interactions = pd.DataFrame({
            "user": inter[opts.user_column].astype(str).str.strip().to_numpy(),
            "item": inter[opts.item_column].astype(str).str.strip().to_numpy(),
            "timestamp": timestamps,
        })
        duplicated = interactions.duplicated(["user", "item", "timestamp"], keep="first")
        report.duplicate_interactions = int(duplicated.sum())
        interactions = interactions[~duplicated].reset_index(drop=True)

        catalogue, first_item_line = self._read_items(items_path)
        id_column = opts.item_id_column
        catalogue[id_column] = catalogue[id_column].astype(str).str.strip()
        lines = list(range(first_item_line, first_item_line + len(catalogue)))
        duplicated = catalogue.duplicated([id_column], keep="first").to_numpy()
        report.duplicate_items = int(duplicated.sum())
        catalogue = catalogue[~duplicated].reset_index(drop=True)
        lines = [line for line, dup in zip(lines, duplicated, strict=True) if not dup]

        attributes = self._attribute_columns(list(catalogue.columns), items_path)
        items = pd.DataFrame({"item": catalogue[id_column].to_numpy()})
        for column in attributes:
            items[column] = [clean_text(v) if isinstance(v, str) else None for v in catalogue[column]]
        image_column = opts.image_column
        references = list(catalogue[image_column]) if image_column and image_column in catalogue.columns else \
            [None] * len(catalogue)
        items["image_path"], items["image_url"] = resolve_images(root, references, items_path, lines, report)
        report.log()
        return RawDataset(name="generic", root=root, interactions=interactions, items=items,
                          attribute_columns=attributes, sources=[inter_path, items_path])

    def _timestamps(self, column: pd.Series, path: Path, first_line: int) -> np.ndarray:
        unit = self.options.timestamp_unit
        if unit == "s":
            return column.to_numpy(np.int64)
        if unit == "ms":
            return column.to_numpy(np.int64) // 1000
        parsed = pd.to_datetime(column, errors="coerce", utc=True, format="ISO8601")
        bad = parsed.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"timestamp {column.iloc[row]!r} is not an ISO 8601 date/time", path, row + first_line)
        return (parsed.astype("datetime64[s, UTC]").astype("int64")).to_numpy(np.int64)

    def _read_items(self, path: Path) -> tuple[pd.DataFrame, int]:
        opts = self.options
        columns: list[str] = []
        if path.is_file():
            try:
                if path.suffix.lower() in (".parquet", ".pq"):
                    columns = list(pq.read_schema(path).names)
                else:
                    columns = list(pd.read_csv(path, nrows=0, dtype=str, encoding="utf-8").columns)
            except Exception:  # the full read below reports the problem with file and line
                columns = []
        return _read_table(path, [opts.item_id_column], [c for c in columns if c != opts.item_id_column], [])

    def _attribute_columns(self, columns: list[str], path: Path) -> list[str]:
        opts = self.options
        if opts.attribute_columns is not None:
            missing = [c for c in opts.attribute_columns if c not in columns]
            if missing:
                raise DataError(f"attribute column(s) {', '.join(missing)} not in the items file; found "
                                f"{', '.join(columns)}", path, 1)
            chosen = list(opts.attribute_columns)
        else:
            chosen = [c for c in columns if c not in (opts.item_id_column, opts.image_column)]
        if "title" in chosen:
            chosen.remove("title")
            chosen.insert(0, "title")
        reserved = {"item", "image_path", "image_url"} & set(chosen)
        if reserved:
            raise DataError(f"attribute column(s) {', '.join(sorted(reserved))} clash with reserved names; "
                            "rename them in the items file", path, 1)
        return chosen
