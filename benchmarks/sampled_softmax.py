"""Sampled softmax (``training.loss = "sampled_ce"``) against full softmax CE on MovieLens: quality and epoch time.

SASRec, one seed, same data, split, negatives and evaluators for every run; each trains to early stopping
(validation sampled NDCG@10). The reference is full CE over the whole catalogue (9,724 items); sampled CE draws
``training.num_negatives`` items per batch (uniformly, or by training popularity), with the logQ correction;
BCE with one negative (the project's default loss) is available as a variant. Epoch time is the mean training seconds of
an epoch (without validation).

    flock /tmp/prismrec-bench.lock .venv/bin/python benchmarks/sampled_softmax.py

Writes ``benchmarks/results/sampled_softmax.{md,json}``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results
from prismrec.config import load_config
from prismrec.training import Trainer, prepare_split

REPO = Path(__file__).resolve().parents[1]
VARIANTS = {
    "ce": ["training.loss='ce'"],
    "sampled_ce_uniform": ["training.loss='sampled_ce'", "training.negative_sampler='uniform'"],
    "sampled_ce_popularity": ["training.loss='sampled_ce'", "training.negative_sampler='popularity'"],
    "sampled_ce_uniform_1024": ["training.loss='sampled_ce'", "training.negative_sampler='uniform'",
                                "training.num_negatives=1024"],
    "sampled_ce_uniform_no_logq": ["training.loss='sampled_ce'", "training.negative_sampler='uniform'",
                                   "training.logq_correction=false"],
    "bce": ["training.loss='bce'"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--set", dest="overrides", action="append",
                        default=["model.max_len=50", "training.max_epochs=100", "training.patience=20",
                                 "training.num_threads=2"])
    parser.add_argument("--negatives", type=int, default=256)
    parser.add_argument("--variants", default="ce,sampled_ce_uniform,sampled_ce_popularity,sampled_ce_uniform_1024,"
                        "sampled_ce_uniform_no_logq",
                        help=f"comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    os.environ.setdefault("PRISMREC_HOME", "/tmp/prismrec-bench")
    names = [v for v in args.variants.split(",") if v]
    split = None
    flat: dict[str, float | int | str] = {"num_negatives": args.negatives}
    rows = []
    for name in names:
        config = load_config(REPO / "configs/movielens_sasrec.toml",
                             [*args.overrides, f"training.num_negatives={args.negatives}", *VARIANTS[name],
                              f"name='bench-loss-{name}'"])
        split = split or prepare_split(config)
        outcome = Trainer(config, split=split, quiet=True).fit()
        epoch_s = float(np.mean([r["train_seconds"] for r in outcome.history]))
        m = outcome.final
        flat[f"{name}_epoch_s"] = round(epoch_s, 3)
        flat[f"{name}_test_ndcg10"] = m["test/sampled"]["ndcg@10"]
        flat[f"{name}_test_hit10"] = m["test/sampled"]["hit@10"]
        flat[f"{name}_full_test_ndcg10"] = m["test/full"]["ndcg@10"]
        flat[f"{name}_full_test_hit10"] = m["test/full"]["hit@10"]
        flat[f"{name}_best_epoch"] = outcome.best_epoch
        rows.append(f"| {name} | {epoch_s:.2f} | {m['test/sampled']['hit@10']:.4f} | "
                    f"{m['test/sampled']['ndcg@10']:.4f} | {m['test/full']['hit@10']:.4f} | "
                    f"{m['test/full']['ndcg@10']:.4f} | "
                    f"{outcome.best_epoch} / {outcome.epochs_run} |")
        print(rows[-1], flush=True)
    for name in names:
        if name.startswith("sampled") and "ce" in names:
            flat[f"{name}_epoch_time_vs_ce"] = round(float(flat[f"{name}_epoch_s"]) / float(flat["ce_epoch_s"]), 3)
            flat[f"{name}_full_ndcg10_vs_ce"] = round(
                float(flat[f"{name}_full_test_ndcg10"]) / float(flat["ce_full_test_ndcg10"]), 3)
    table = ("| loss | epoch s | test H@10 (sampled) | test N@10 (sampled) | test H@10 (full) | test N@10 (full) | "
             "best / run epochs |\n|---|---:|---:|---:|---:|---:|---:|\n" + "\n".join(rows))
    write_results("sampled_softmax", flat, table,
                  f"SASRec on MovieLens (ml-latest-small), seed 42, overrides {args.overrides}; sampled CE with "
                  f"{args.negatives} negatives per batch (shared by its positions, logQ-corrected). Ratios in the "
                  f"JSON: `*_epoch_time_vs_ce` (lower is faster), `*_full_ndcg10_vs_ce` (quality kept).")
    print(table)


if __name__ == "__main__":
    main()
