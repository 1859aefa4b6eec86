"""DMESR seconds per training epoch divided by plain SASRec's, on MovieLens, in the same invocation.

The adapters act on frozen per-item inputs, so DMESR adapts each distinct item of a batch once; the
naive formulation (adapting every token) is timed too, to show what that saves. Epochs alternate
between the models so that machine noise hits them alike.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from torch import nn

from _common import write_results
from prismrec.config import load_config
from prismrec.training import Trainer
from prismrec.training.trainer import TrainingLoss


class NaiveDMESRLoss(nn.Module):
    """DMESR's loss with the adapters run once per token instead of once per distinct item."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.training_loss(batch, "bce", naive=True)


def epoch_seconds(trainer: Trainer, naive: bool = False) -> float:
    model = trainer.model
    step = NaiveDMESRLoss(model) if naive else TrainingLoss(model, "bce")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    trainer._epoch(step, optimizer, trainer._train_users())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--semantics", default="movielens-small-describe")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=200)
    args = parser.parse_args()
    os.environ.setdefault("PRISMREC_HOME", "/tmp/prismrec-bench")
    common = [f"model.max_len={args.max_len}", "name='bench'"]
    sasrec_cfg = load_config("configs/movielens_sasrec.toml", common)
    dmesr_cfg = load_config("configs/movielens_dmesr_sasrec.toml", [*common, f"model.semantics='{args.semantics}'"])
    sasrec = Trainer(sasrec_cfg, quiet=True)
    dmesr = Trainer(dmesr_cfg, split=sasrec.split, quiet=True)
    times: dict[str, list[float]] = {"sasrec": [], "dmesr": [], "dmesr_naive": []}
    for _ in range(args.epochs):
        times["sasrec"].append(epoch_seconds(sasrec))
        times["dmesr"].append(epoch_seconds(dmesr))
        times["dmesr_naive"].append(epoch_seconds(dmesr, naive=True))
    med = {k: float(np.median(v)) for k, v in times.items()}
    flat = {
        "epoch_time_ratio": med["dmesr"] / med["sasrec"],
        "naive_epoch_time_ratio": med["dmesr_naive"] / med["sasrec"],
        "sasrec_epoch_seconds": med["sasrec"],
        "dmesr_epoch_seconds": med["dmesr"],
        "dmesr_naive_epoch_seconds": med["dmesr_naive"],
        "epochs_timed": args.epochs,
        "torch_threads": torch.get_num_threads(),
    }
    table = "| model | median s/epoch | ratio to SASRec |\n|---|---:|---:|\n" + "\n".join(
        f"| {k} | {med[k]:.2f} | {med[k] / med['sasrec']:.2f} |" for k in ("sasrec", "dmesr", "dmesr_naive"))
    write_results("dmesr_overhead", flat, table,
                  f"MovieLens, max_len {args.max_len}, hidden 128, batch 128, {args.epochs} alternating epochs each "
                  f"(median), {torch.get_num_threads()} torch threads. Target: epoch_time_ratio <= 1.5.")
    print(table)


if __name__ == "__main__":
    main()
