"""Leave-one-out split (paper section 4.1.1): last item test, second-to-last validation, rest training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from prismrec.data.dataset import SequenceDataset

Stage = Literal["valid", "test"]


@dataclass
class LeaveOneOutSplit:
    """Per-user leave-one-out split of a :class:`SequenceDataset`.

    Users with fewer than 3 interactions cannot give a training, validation and test item; they are kept
    for training only (their whole sequence) and are not evaluated.
    """

    dataset: SequenceDataset

    def __post_init__(self) -> None:
        lengths = np.array([len(s) for s in self.dataset.sequences])
        self.eval_users: np.ndarray = np.flatnonzero(lengths >= 3)
        self.train_only_users: np.ndarray = np.flatnonzero(lengths < 3)

    def train_sequence(self, user: int) -> np.ndarray:
        seq = self.dataset.sequences[user]
        return seq[:-2] if len(seq) >= 3 else seq

    @property
    def train_sequences(self) -> list[np.ndarray]:
        return [self.train_sequence(u) for u in range(self.dataset.n_users)]

    def inputs_and_target(self, user: int, stage: Stage) -> tuple[np.ndarray, int]:
        """History the model sees and the held-out item, for ``stage``."""
        seq = self.dataset.sequences[user]
        if stage == "valid":
            return seq[:-2], int(seq[-2])
        if stage == "test":
            return seq[:-1], int(seq[-1])
        raise ValueError(f"unknown stage {stage!r}")

    def targets(self, stage: Stage) -> np.ndarray:
        offset = 2 if stage == "valid" else 1
        return np.array([self.dataset.sequences[u][-offset] for u in self.eval_users], dtype=np.int64)
