"""SASRec / BERT4Rec / GRU4Rec on MovieLens (ml-latest-small): test Hit@10 and NDCG@10 in the paper's
sampled protocol (100 negatives) and in full ranking, over several seeds, next to the paper's "None" rows.

Reference run in the same invocation: the most-popular ranker under the same evaluators, so every
backbone's NDCG@10 is also reported as a ratio over that floor (and over SASRec).

    .venv/bin/python benchmarks/backbones.py                                  # paper sizes, 3 seeds each
    .venv/bin/python benchmarks/backbones.py --runs sasrec:3,gru4rec:3,bert4rec:1 \\
        --set model.max_len=50 --set model.hidden_size=64 --set training.lr=0.002 --max-epochs 60 --patience 10

Writes ``benchmarks/results/backbones.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from prismrec.config import load_config
from prismrec.training import Trainer, prepare_split

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PAPER_NONE = {"sasrec": (0.4951, 0.3307), "bert4rec": (0.6738, 0.4270), "gru4rec": (0.4951, 0.3462)}


def parse_runs(text: str) -> list[tuple[str, int]]:
    out = []
    for part in text.split(","):
        name, _, count = part.partition(":")
        out.append((name.strip(), int(count or 3)))
    return out


@dataclass
class KeptRows:
    """What ``--keep-existing`` carries over from the previous report for backbones not rerun."""

    names: list[str]
    summary: dict[str, float | int | str]
    lines: dict[str, list[str]]
    commands: list[str]
    minutes: str


def kept_rows(out: Path, rerun: set[str]) -> KeptRows | None:
    md_path, json_path = out / "backbones.md", out / "backbones.json"
    if not (md_path.exists() and json_path.exists()):
        return None
    old = json.loads(json_path.read_text())
    names = sorted({k.removesuffix("_seeds") for k in old if k.endswith("_seeds")} - rerun)
    summary = {k: v for k, v in old.items() if any(k.startswith(f"{n}_") for n in names)}
    lines: dict[str, list[str]] = {"summary": [], "runs": [], "settings": []}
    commands: list[str] = []
    section = "summary"
    minutes = "wall time not recorded"
    for line in md_path.read_text().splitlines():
        if line.startswith("Per run:"):
            section = "runs"
        elif line.startswith("Settings:"):
            section = "settings"
        elif line.startswith("Command") and ("`" in line):
            commands.append(line.split("`", 1)[1].rsplit("`", 1)[0])
        elif line.startswith("`") and line.endswith("`") and "benchmarks/backbones.py" in line:
            commands.append(line.strip("`"))
        elif "Total wall time" in line or "Wall time of this invocation" in line:
            minutes = "total wall time " + line.rsplit("time", 1)[1].strip(" .")
        if any(line.startswith(f"| {n} |") or line.startswith(f"- {n}: ") for n in names):
            lines[section].append(line)
    return KeptRows(names, summary, lines, commands, minutes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="sasrec:3,bert4rec:3,gru4rec:3", help="backbone:seeds, comma-separated")
    parser.add_argument("--set", action="append", default=[], help="config override applied to every backbone")
    parser.add_argument("--max-epochs", type=int, default=None)
    parser.add_argument("--patience", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep-existing", action="store_true",
                        help="keep the rows of backbones not in --runs from the existing backbones.md/.json "
                             "(each backbone's rows come from one invocation; both commands are recorded)")
    args = parser.parse_args()

    common = list(args.set)
    if args.max_epochs is not None:
        common.append(f"training.max_epochs={args.max_epochs}")
    if args.patience is not None:
        common.append(f"training.patience={args.patience}")
    runs = parse_runs(args.runs)
    split = prepare_split(load_config(REPO / "configs/movielens_sasrec.toml"))
    rows: dict[str, list[dict[str, float]]] = {}
    settings: dict[str, dict] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="prismrec-bench-") as tmp:
        pop = Trainer(load_config(None, ["model.name='popularity'", "name='popularity'"]), split=split,
                      run_dir=Path(tmp) / "popularity", quiet=True).fit()
        for name, seeds in runs:
            for seed in range(42, 42 + seeds):
                config = load_config(REPO / f"configs/movielens_{name}.toml", [*common, f"seed={seed}"])
                settings[name] = {"model": config.model.model_dump(), "training": config.training.model_dump()}
                outcome = Trainer(config, split=split, run_dir=Path(tmp) / f"{name}-{seed}").fit()  # progress bar
                final = outcome.final
                row = {"seed": seed, "best_epoch": outcome.best_epoch, "epochs_run": outcome.epochs_run,
                       "seconds": outcome.seconds,
                       "sampled_hit10": final["test/sampled"]["hit@10"],
                       "sampled_ndcg10": final["test/sampled"]["ndcg@10"],
                       "full_hit10": final["test/full"]["hit@10"], "full_ndcg10": final["test/full"]["ndcg@10"]}
                rows.setdefault(name, []).append(row)
                print(f"{name} seed {seed}: best epoch {outcome.best_epoch}/{outcome.epochs_run} "
                      f"({outcome.seconds:.0f}s)  sampled H@10 {row['sampled_hit10']:.4f} N@10 "
                      f"{row['sampled_ndcg10']:.4f}  full H@10 {row['full_hit10']:.4f} N@10 {row['full_ndcg10']:.4f}",
                      flush=True)
    total = time.perf_counter() - started

    pop_sampled = pop.final["test/sampled"]["ndcg@10"]
    summary: dict[str, float | int | str] = {"popularity_sampled_ndcg10": pop_sampled,
                                             "popularity_sampled_hit10": pop.final["test/sampled"]["hit@10"],
                                             "popularity_full_ndcg10": pop.final["test/full"]["ndcg@10"],
                                             "total_seconds": total}
    for name, items in rows.items():
        for key in ("sampled_hit10", "sampled_ndcg10", "full_hit10", "full_ndcg10", "epochs_run", "best_epoch"):
            values = np.array([r[key] for r in items], dtype=float)
            summary[f"{name}_{key}_mean"] = float(values.mean())
            summary[f"{name}_{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[f"{name}_seeds"] = len(items)
        summary[f"{name}_seconds_mean"] = float(np.mean([r["seconds"] for r in items]))
        summary[f"{name}_ndcg10_ratio_vs_popularity"] = summary[f"{name}_sampled_ndcg10_mean"] / pop_sampled
        summary[f"{name}_paper_hit10"], summary[f"{name}_paper_ndcg10"] = PAPER_NONE[name]
    if "sasrec" in rows:
        for name in rows:
            summary[f"{name}_ndcg10_ratio_vs_sasrec"] = (summary[f"{name}_sampled_ndcg10_mean"]
                                                         / summary["sasrec_sampled_ndcg10_mean"])

    args.out.mkdir(parents=True, exist_ok=True)
    command = " ".join(["OMP_WAIT_POLICY=PASSIVE", ".venv/bin/python", "benchmarks/backbones.py", *sys.argv[1:]])
    kept = kept_rows(args.out, set(rows)) if args.keep_existing else None
    if kept is not None:
        summary = {**kept.summary, **summary}
    (args.out / "backbones.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    header = [f"Command: `{command}`"]
    if kept is not None and kept.names:
        header = [f"Command for {', '.join(rows)}: `{command}`", "",
                  f"Rows of {', '.join(kept.names)} kept from an earlier invocation ({kept.minutes}):", "",
                  *(f"`{c.strip('`')}`" for c in kept.commands)]
    lines = ["# Backbones on MovieLens (ml-latest-small)", "", *header, "",
             f"Machine: {platform.platform()}, {os.cpu_count()} CPUs (shared). Wall time of this invocation "
             f"{total / 60:.1f} min.",
             "", "Test metrics of the best-validation checkpoint (mean ± std over seeds). Sampled: the positive "
             "against 100 unseen items (paper 4.1.3); full: against every item the user has not seen.", "",
             "| backbone | seeds | epochs run (best) | sampled H@10 | sampled N@10 | full H@10 | full N@10 | "
             "paper H@10 / N@10 | N@10 / popularity |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, items in rows.items():
        s = summary

        def cell(key: str, name: str = name, s: dict = s) -> str:
            return f"{s[f'{name}_{key}_mean']:.4f} ± {s[f'{name}_{key}_std']:.4f}"

        epochs = f"{s[f'{name}_epochs_run_mean']:.0f} ({s[f'{name}_best_epoch_mean']:.0f})"
        lines.append(f"| {name} | {len(items)} | {epochs} | "
                     f"{cell('sampled_hit10')} | {cell('sampled_ndcg10')} | {cell('full_hit10')} | "
                     f"{cell('full_ndcg10')} | {PAPER_NONE[name][0]:.4f} / {PAPER_NONE[name][1]:.4f} | "
                     f"{s[f'{name}_ndcg10_ratio_vs_popularity']:.2f} |")
    if kept is not None:
        lines += kept.lines["summary"]
    lines += [f"| popularity (reference) | - | - | {pop.final['test/sampled']['hit@10']:.4f} | {pop_sampled:.4f} | "
              f"{pop.final['test/full']['hit@10']:.4f} | {pop.final['test/full']['ndcg@10']:.4f} | - | 1.00 |", "",
              "Per run:", "", "| backbone | seed | epochs run | best epoch | seconds | sampled N@10 | full N@10 |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, items in rows.items():
        for r in items:
            lines.append(f"| {name} | {r['seed']} | {r['epochs_run']} | {r['best_epoch']} | {r['seconds']:.0f} | "
                         f"{r['sampled_ndcg10']:.4f} | {r['full_ndcg10']:.4f} |")
    if kept is not None:
        lines += kept.lines["runs"]
    lines += ["", "Settings:", ""]
    for name, cfg in settings.items():
        lines.append(f"- {name}: model {json.dumps(cfg['model'])}; training {json.dumps(cfg['training'])}")
    if kept is not None:
        lines += kept.lines["settings"]
    (args.out / "backbones.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'backbones.md'}")


if __name__ == "__main__":
    main()
