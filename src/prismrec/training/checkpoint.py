"""Resumable training state, without pickle: one safetensors file holding the tensors (model, optimizer,
torch RNG as uint8) and, in its metadata, a JSON document with everything else (epoch, early-stopping
state, numpy ``Generator`` states, Python ``random`` state, optimizer hyper-parameters, metric history).

The file is written to a temporary name and renamed, so a process killed at any moment (``kill -9``)
leaves either the previous checkpoint or the new one, never half of one.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
STATE_KEY = "prismrec_training_state"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used to resume this run."""


@dataclass
class EarlyStopping:
    best_value: float = float("-inf")
    best_epoch: int = 0
    stale: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"best_value": self.best_value if np.isfinite(self.best_value) else None,
                "best_epoch": self.best_epoch, "stale": self.stale}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EarlyStopping:
        value = data["best_value"]
        return cls(float("-inf") if value is None else float(value), int(data["best_epoch"]), int(data["stale"]))


@dataclass
class RankRandomState:
    """Random generators of one process: the trainer's numpy generators and torch's CPU generator."""

    numpy: dict[str, dict[str, Any]]
    torch_cpu: torch.Tensor
    python: list[Any] | None = None

    @classmethod
    def capture(cls, generators: dict[str, np.random.Generator]) -> RankRandomState:
        version, internal, gauss = random.getstate()
        return cls({name: g.bit_generator.state for name, g in generators.items()}, torch.get_rng_state(),
                   [version, list(internal), gauss])

    def restore(self, generators: dict[str, np.random.Generator]) -> None:
        for name, generator in generators.items():
            if name not in self.numpy:
                raise CheckpointError(f"checkpoint has no state for random generator {name!r}")
            generator.bit_generator.state = self.numpy[name]
        torch.set_rng_state(self.torch_cpu)
        if self.python is not None:
            version, internal, gauss = self.python
            random.setstate((version, tuple(internal), gauss))


@dataclass
class TrainingState:
    epoch: int  # epochs completed
    finished: bool
    stopping: EarlyStopping
    history: list[dict[str, Any]]
    config_hash: str
    world_size: int
    random_states: list[RankRandomState]  # one per rank
    model: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)


def _optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for index, entries in info["scalars"].items():
        state.setdefault(int(index), {}).update(entries)
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in group.items()}
              for group in info["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_state(path: Path, state: TrainingState) -> None:
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in state.model.items()}
    optim_tensors, optim_info = _optimizer_to_flat(state.optimizer)
    tensors.update({k: v.detach().contiguous().cpu() for k, v in optim_tensors.items()})
    for rank, rs in enumerate(state.random_states):
        tensors[f"rng.torch_cpu.{rank}"] = rs.torch_cpu.contiguous()
    document = {
        "format": FORMAT_VERSION, "epoch": state.epoch, "finished": state.finished,
        "early_stopping": state.stopping.to_json(), "history": state.history, "config_hash": state.config_hash,
        "world_size": state.world_size, "optimizer": optim_info,
        "numpy_rng": [rs.numpy for rs in state.random_states],
        "python_random": [rs.python for rs in state.random_states],
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={STATE_KEY: json.dumps(document)})
    tmp.replace(path)


def load_training_state(path: Path) -> TrainingState:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path}: not a readable checkpoint ({exc})") from None
    if STATE_KEY not in metadata:
        raise CheckpointError(f"{path}: no training state in this file (is it a model-only checkpoint?)")
    document = json.loads(metadata[STATE_KEY])
    if document.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {document.get('format')} is not {FORMAT_VERSION}")
    world = int(document["world_size"])
    random_states = [RankRandomState(document["numpy_rng"][r], tensors[f"rng.torch_cpu.{r}"],
                                     document["python_random"][r]) for r in range(world)]
    model = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = _optimizer_from_flat({k: v for k, v in tensors.items() if k.startswith("optimizer.")},
                                     document["optimizer"])
    return TrainingState(int(document["epoch"]), bool(document["finished"]),
                         EarlyStopping.from_json(document["early_stopping"]), document["history"],
                         document["config_hash"], world, random_states, model, optimizer)
