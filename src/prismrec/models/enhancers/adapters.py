"""Adapters from frozen MLLM/text-encoder embeddings to the recommender's space, and the frozen tables.

DMESR Eq. (1)/(4): ``Adapter(e) = W2 (W1 e + b1) + b2`` with ``d1 = d0 / 2``. The paper's adapter has
no non-linearity between the two maps (so it is one low-rank affine map); an activation is offered as an
option.

Efficiency: the adapters act on frozen per-item inputs, so adapting a batch means adapting its *unique*
items once and gathering, never running the projection once per token (``SemanticItemTables.gather``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prismrec.data.dataset import SequenceDataset

Activation = Literal["none", "relu", "gelu", "tanh"]


class Adapter(nn.Module):
    """Two affine maps d0 -> d0/2 -> d (DMESR Eq. 1), optionally with an activation in between."""

    def __init__(self, in_dim: int, out_dim: int, activation: Activation = "none", hidden: int | None = None,
                 dropout: float = 0.0) -> None:
        super().__init__()
        hidden = hidden or max(in_dim // 2, 1)
        self.fc1 = nn.Linear(in_dim, hidden)  # W1, b1
        self.fc2 = nn.Linear(hidden, out_dim)  # W2, b2
        self.activation: nn.Module = {"none": nn.Identity(), "relu": nn.ReLU(), "gelu": nn.GELU(),
                                      "tanh": nn.Tanh()}[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.activation, nn.Identity) and (self.dropout.p == 0 or not self.training):
            # Without an activation the two maps are one affine map: W2 (W1 x + b1) + b2 = (W2 W1) x + W2 b1 + b2.
            # Folding W2 W1 first (d x d0, tiny) halves the work over thousands of items per batch.
            weight = self.fc2.weight @ self.fc1.weight
            bias = self.fc2.weight @ self.fc1.bias + self.fc2.bias
            return F.linear(x, weight, bias)
        return self.fc2(self.dropout(self.activation(self.fc1(x))))


def load_semantic_matrices(source: str | Path, dataset: SequenceDataset,
                           routes: Sequence[str], optional_routes: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Rows of the artefact's matrices re-ordered to ``dataset``'s internal item ids (row 0 = padding).

    Rows are matched by external item id, so an artefact derived for a superset of the items (e.g. before
    filtering) can be used; an item the artefact lacks is an error, never a silent zero vector.
    A matrix named in ``routes`` must exist; one named only in ``optional_routes`` is returned when the
    artefact has it and left out otherwise (e.g. X-REFLECT's ``xreflect`` descriptions).
    """
    from prismrec.semantics.artefact import ArtefactError, load_artefact

    artefact = load_artefact(source)
    position = {item: row for row, item in enumerate(artefact.item_ids)}
    wanted = [str(i) for i in dataset.item_ids[1:]]
    missing = [item for item in wanted if item not in position]
    if missing:
        raise ArtefactError(f"{artefact.path}: no semantics for {len(missing)} item(s) of {dataset.name!r} "
                            f"(e.g. {missing[:3]}); derive semantics for this dataset first")
    rows = np.array([0, *[position[item] for item in wanted]], dtype=np.int64)
    out: dict[str, np.ndarray] = {}
    present = [r for r in optional_routes if r in artefact.matrices and r not in routes]
    for route in [*routes, *present]:
        if route not in artefact.matrices:
            raise ArtefactError(f"{artefact.path}: matrix {route!r} missing; have {sorted(artefact.matrices)}")
        matrix = artefact.matrices[route][rows].astype(np.float32)
        matrix[0] = 0.0
        out[route] = matrix
    return out


class SemanticItemTables(nn.Module):
    """Frozen per-item embedding matrices (buffers, saved with the model, never trained)."""

    def __init__(self, matrices: dict[str, np.ndarray | torch.Tensor]) -> None:
        super().__init__()
        self.routes = list(matrices)
        for route, matrix in matrices.items():
            self.register_buffer(f"table_{route}", torch.as_tensor(np.asarray(matrix), dtype=torch.float32))
        self.n_items = next(iter(matrices.values())).shape[0] - 1

    def table(self, route: str) -> torch.Tensor:
        return getattr(self, f"table_{route}")

    def dim(self, route: str) -> int:
        return self.table(route).shape[1]


def unique_with_inverse(*id_tensors: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Unique ids across several id tensors, and for each tensor the index of its ids in that list."""
    flat = torch.cat([t.reshape(-1) for t in id_tensors])
    unique, inverse = torch.unique(flat, return_inverse=True)
    out, start = [], 0
    for t in id_tensors:
        out.append(inverse[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return unique, out
