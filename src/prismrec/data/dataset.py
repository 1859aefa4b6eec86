"""The common in-memory form every loader produces, and the processed sequence form models use.

``RawDataset`` is what a loader returns: interactions with external ids, and an item catalogue whose
columns are textual attributes plus an optional image path per item (images are referenced, never
loaded here; every path is checked to stay inside the dataset root by the loader via ``safe_join``).

``SequenceDataset`` is the same data after filtering and id remapping: one chronological sequence of
internal item ids per user, with item id 0 reserved for padding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from prismrec.data.errors import DataError

PAD_ITEM = 0


@dataclass
class RawDataset:
    """Interactions and item catalogue with external ids, as read from the files.

    ``interactions``: columns ``user`` (str), ``item`` (str), ``timestamp`` (int64, seconds); row order is
    file order, which breaks ties between equal timestamps.
    ``items``: one row per item, column ``item`` (str, unique), ``image_path`` (absolute ``Path`` inside
    ``root`` or ``None``) and the textual attribute columns named in ``attribute_columns`` (str or
    ``None`` where missing), ``title`` first.
    """

    name: str
    root: Path
    interactions: pd.DataFrame
    items: pd.DataFrame
    attribute_columns: list[str]
    sources: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        for column in ("user", "item", "timestamp"):
            if column not in self.interactions.columns:
                raise DataError(f"loader for {self.name!r} produced interactions without column {column!r}")
        for column in ("item", "image_path", *self.attribute_columns):
            if column not in self.items.columns:
                raise DataError(f"loader for {self.name!r} produced an item catalogue without column {column!r}")


@dataclass
class SequenceDataset:
    """Filtered, remapped, chronological sequences; internal item ids start at 1 (0 = padding)."""

    name: str
    root: Path
    user_ids: np.ndarray  # internal user index -> external user id (str)
    item_ids: np.ndarray  # internal item id -> external item id (str); item_ids[0] == "<pad>"
    sequences: list[np.ndarray]  # per user, int64 internal item ids in chronological order
    timestamps: list[np.ndarray]  # per user, int64, aligned with ``sequences``
    items: pd.DataFrame  # catalogue rows in internal id order: row k describes item k + 1
    attribute_columns: list[str]
    fingerprint: str
    filters: dict[str, int] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        """Number of real items (internal ids 1..n_items)."""
        return len(self.item_ids) - 1

    @property
    def n_interactions(self) -> int:
        return int(sum(len(s) for s in self.sequences))

    def item_index(self) -> dict[str, int]:
        """External item id -> internal id."""
        return {str(ext): i for i, ext in enumerate(self.item_ids) if i != PAD_ITEM}

    def item_attributes(self, item: int) -> dict[str, str]:
        """Non-empty textual attributes of internal item ``item``, in catalogue column order."""
        row = self.items.iloc[item - 1]
        return {c: str(row[c]) for c in self.attribute_columns if row[c] is not None and str(row[c]) != ""}

    def image_path(self, item: int) -> Path | None:
        value = self.items.iloc[item - 1]["image_path"]
        return value if isinstance(value, Path) else None

    def stats(self) -> dict[str, float]:
        """The paper's Table 1 columns."""
        n_inter = self.n_interactions
        return {
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n_inter,
            "avg_sequence_length": n_inter / max(self.n_users, 1),
            "sparsity": 1.0 - n_inter / max(self.n_users * self.n_items, 1),
        }


def k_core_filter(interactions: pd.DataFrame, min_user: int, min_item: int) -> pd.DataFrame:
    """Iteratively drop users with < ``min_user`` and items with < ``min_item`` interactions until stable."""
    frame = interactions
    while True:
        before = len(frame)
        if min_item > 1:
            counts = frame["item"].map(frame["item"].value_counts())
            frame = frame[counts >= min_item]
        if min_user > 1:
            counts = frame["user"].map(frame["user"].value_counts())
            frame = frame[counts >= min_user]
        if len(frame) == before:
            return frame


def _fingerprint(item_ids: np.ndarray, sequences: list[np.ndarray], timestamps: list[np.ndarray],
                 items: pd.DataFrame, attribute_columns: list[str]) -> str:
    digest = hashlib.sha256()
    digest.update("\x1f".join(map(str, item_ids)).encode())
    for seq, ts in zip(sequences, timestamps, strict=True):
        digest.update(np.int64(len(seq)).tobytes())
        digest.update(seq.astype(np.int64).tobytes())
        digest.update(ts.astype(np.int64).tobytes())
    for column in attribute_columns:
        digest.update(column.encode())
        digest.update("\x1f".join("" if v is None else str(v) for v in items[column]).encode())
    digest.update("\x1f".join("" if p is None else Path(p).name for p in items["image_path"]).encode())
    return digest.hexdigest()[:16]


def build_sequences(raw: RawDataset, min_user_interactions: int = 1, min_item_interactions: int = 1) -> SequenceDataset:
    """Filter, remap ids (items by first appearance in time order) and build chronological sequences.

    Equal timestamps keep file order (stable sort), so the same files always give the same sequences.
    """
    inter = raw.interactions[["user", "item", "timestamp"]].copy()
    inter["_row"] = np.arange(len(inter))
    known_items = set(raw.items["item"].astype(str))
    unknown = ~inter["item"].isin(known_items)
    if unknown.any():
        # Interactions with items the catalogue does not describe cannot be enhanced; drop them.
        inter = inter[~unknown]
    inter = k_core_filter(inter, min_user_interactions, min_item_interactions)
    if inter.empty:
        raise DataError(
            f"dataset {raw.name!r} is empty after filtering (min_user_interactions={min_user_interactions}, "
            f"min_item_interactions={min_item_interactions}); lower the thresholds",
            raw.root,
        )
    inter = inter.sort_values(["timestamp", "_row"], kind="mergesort")
    item_codes, item_uniques = pd.factorize(inter["item"], sort=False)
    item_ids = np.array(["<pad>", *map(str, item_uniques)], dtype=object)
    inter = inter.assign(_iid=item_codes + 1)
    inter = inter.sort_values(["user", "timestamp", "_row"], kind="mergesort")
    user_codes, user_uniques = pd.factorize(inter["user"], sort=False)
    bounds = np.flatnonzero(np.diff(user_codes)) + 1
    iids = inter["_iid"].to_numpy(np.int64)
    tss = inter["timestamp"].to_numpy(np.int64)
    sequences = np.split(iids, bounds)
    timestamps = np.split(tss, bounds)
    catalogue = raw.items.assign(item=raw.items["item"].astype(str)).set_index("item")
    items = catalogue.loc[list(item_ids[1:])].reset_index()
    fingerprint = _fingerprint(item_ids, sequences, timestamps, items, raw.attribute_columns)
    return SequenceDataset(
        name=raw.name,
        root=raw.root,
        user_ids=np.array(list(map(str, user_uniques)), dtype=object),
        item_ids=item_ids,
        sequences=sequences,
        timestamps=timestamps,
        items=items,
        attribute_columns=list(raw.attribute_columns),
        fingerprint=fingerprint,
        filters={"min_user_interactions": min_user_interactions, "min_item_interactions": min_item_interactions},
    )
