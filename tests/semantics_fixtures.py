"""Write small semantics artefacts in the on-disk format `prismrec derive` produces (for model tests)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

ROUTES = ("text", "visual", "hybrid", "original")


def write_artefact(folder: Path, item_ids: list[str], dim: int = 12, seed: int = 0) -> Path:
    """Random but fixed embeddings for ``item_ids`` (external ids, without padding) in artefact format."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    matrices = {}
    for route in ROUTES:
        matrix = rng.normal(size=(len(item_ids) + 1, dim)).astype(np.float32)
        matrix[0] = 0.0
        matrices[route] = matrix
    save_file(matrices, str(folder / "embeddings.safetensors"))
    (folder / "items.json").write_text(json.dumps({"item_ids": ["<pad>", *item_ids]}))
    return folder
