"""The dataset registry: every loader turns files on disk into a :class:`RawDataset`.

A loader is a class with a ``name``, a pydantic ``Options`` model for its loader-specific settings and
a ``load(root)`` method. Register it with ``@DATASETS.register("name")``; ``load_dataset`` finds the
dataset folder (see :mod:`prismrec.data.paths`) and validates the options.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Protocol

from pydantic import BaseModel, ConfigDict

from prismrec.data.dataset import RawDataset, SequenceDataset, build_sequences
from prismrec.data.paths import resolve_dataset_root
from prismrec.registry import Registry


class NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DatasetLoader(Protocol):
    Options: ClassVar[type[BaseModel]]
    folder: ClassVar[str]  # default folder name under the data directory

    def __init__(self, options: BaseModel) -> None: ...

    def load(self, root: Path) -> RawDataset: ...


DATASETS: Registry[type[DatasetLoader]] = Registry("dataset")


def load_raw(name: str, data_dir: Path | str | None = None, options: dict[str, Any] | None = None,
             folder: str | None = None) -> RawDataset:
    """Load dataset ``name`` from ``data_dir/<folder>`` (folder defaults to the loader's own)."""
    loader_cls = DATASETS.get(name)
    opts = loader_cls.Options.model_validate(options or {})
    root = resolve_dataset_root(folder or loader_cls.folder, data_dir)
    return loader_cls(opts).load(root)


def load_sequences(name: str, data_dir: Path | str | None = None, *, min_user_interactions: int = 1,
                   min_item_interactions: int = 1, options: dict[str, Any] | None = None,
                   folder: str | None = None) -> SequenceDataset:
    raw = load_raw(name, data_dir, options, folder)
    return build_sequences(raw, min_user_interactions, min_item_interactions)
