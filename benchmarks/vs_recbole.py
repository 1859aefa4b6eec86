"""prismrec's SASRec against RecBole 1.2.1's SASRec on the same MovieLens interactions, in one invocation.

RecBole is the peer library a user would pick instead. It cannot share our pinned environment (it needs
numpy < 2 and pandas < 2.3), so this script creates its own virtual environment for it
(``$PRISMREC_HOME/cache/recbole-venv``: RecBole 1.2.1 beside the same CPU torch, which pip takes from the
local wheel cache) and runs each side in a fresh process, which also gives each its own peak RSS.

Matched settings: the interactions our loader produces (exported as RecBole atomic files, the
timestamp being the position in our order so both sides see identical sequences), leave-one-out split,
2 blocks, 1 head, feed-forward size = hidden size, ReLU, dropout 0.2, Adam lr 1e-3, batch 128, the same
CPU threads, validation NDCG@10 every epoch, early stopping with the same patience. Known differences,
by design of each library: RecBole's SASRec trains with CE (its default; it has no BCE) on every prefix of
every sequence (~99k instances per epoch), ours with BCE and one sampled negative on all positions of the
610 sequences at once, so seconds per epoch are not comparable and the headline is wall time to converge
and the test metrics reached. RecBole's "uni100" samples its own 100 negatives; ours uses the paper's
fixed set; both also report full ranking.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vs_recbole.py                 # full grid
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/vs_recbole.py \\
        --grid 50x64:converge,200x128:epoch --recbole-budget-min 12 --patience 5      # what fits a busy laptop

A grid entry is ``MAXLENxHIDDEN:converge`` (train both to early stopping; RecBole stops at the wall-time
budget if it has not converged by then, which makes its time a lower bound) or ``...:epoch`` (time one of
our epochs and the first ``--epoch-batches`` batches of a RecBole epoch, extrapolated to the whole epoch).
Writes ``benchmarks/results/vs_recbole.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
REPO = HERE.parents[1]
RESULTS = REPO / "benchmarks" / "results"
RECBOLE_PINS = ["recbole==1.2.1", "numpy<2", "pandas<2.3"]
DATASET = "ml-prismrec"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


# ------------------------------------------------------------------------------------------------ children


def child_ours(args: argparse.Namespace) -> dict:
    import torch

    from prismrec.config import load_config
    from prismrec.training import Trainer

    torch.set_num_threads(args.threads)
    overrides = [f"model.max_len={args.max_len}", f"model.hidden_size={args.hidden}", "model.num_heads=1",
                 "model.num_blocks=2", "training.batch_size=128", "training.lr=0.001",
                 f"training.patience={args.patience}", f"training.max_epochs={args.max_epochs}",
                 f"training.num_threads={args.threads}", f"seed={args.seed}", f"training.loss='{args.ours_loss}'",
                 f"training.window='{args.ours_window}'"]
    if args.mode == "epoch":
        overrides.append("training.max_epochs=2")
    config = load_config(REPO / "configs/movielens_sasrec.toml", overrides)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(config, run_dir=Path(tmp) / "run", quiet=True)
        outcome = trainer.fit()
    epoch_seconds = [r["train_seconds"] for r in outcome.history]
    final = outcome.final
    converged = {"converged": outcome.epochs_run < args.max_epochs} if args.mode == "converge" else {}
    return {**converged, "seconds": outcome.seconds, "epochs": outcome.epochs_run, "best_epoch": outcome.best_epoch,
            "epoch_seconds": min(epoch_seconds),
            "ndcg10_sampled": final["test/sampled"]["ndcg@10"], "hit10_sampled": final["test/sampled"]["hit@10"],
            "ndcg10_full": final["test/full"]["ndcg@10"], "hit10_full": final["test/full"]["hit@10"],
            "peak_rss_mb": peak_rss_mb()}


def _recbole_config(args: argparse.Namespace, data_dir: Path, mode: str):
    from recbole.config import Config
    from recbole.model.sequential_recommender import SASRec

    settings = {
        "data_path": str(data_dir), "dataset": DATASET, "checkpoint_dir": str(data_dir / "saved"),
        "use_gpu": False, "device": "cpu", "seed": args.seed, "reproducibility": True, "show_progress": False,
        "state": "WARNING", "worker": 0,
        "load_col": {"inter": ["user_id", "item_id", "timestamp"]}, "MAX_ITEM_LIST_LENGTH": args.max_len,
        "n_layers": 2, "n_heads": 1, "hidden_size": args.hidden, "inner_size": args.hidden, "hidden_act": "relu",
        "hidden_dropout_prob": 0.2, "attn_dropout_prob": 0.2, "loss_type": "CE",
        "train_batch_size": 128, "learning_rate": 0.001, "epochs": args.max_epochs, "stopping_step": args.patience,
        "train_neg_sample_args": None, "eval_batch_size": 256,
        "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "group_by": "user", "mode": mode},
        "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
    }
    return Config(model=SASRec, dataset=DATASET, config_dict=settings)


def child_recbole(args: argparse.Namespace) -> dict:
    import copy
    import itertools

    import torch
    from recbole.data import create_dataset, data_preparation
    from recbole.model.sequential_recommender import SASRec
    from recbole.trainer import Trainer
    from recbole.utils import init_seed

    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    config = _recbole_config(args, data_dir, "uni100")
    init_seed(config["seed"], config["reproducibility"])
    dataset = create_dataset(config)
    train_data, valid_data, test_data = data_preparation(config, dataset)
    init_seed(config["seed"], config["reproducibility"])
    model = SASRec(config, train_data.dataset)
    trainer = Trainer(config, model)
    instances = len(train_data.dataset)
    out: dict = {"train_instances": instances, "batches_per_epoch": len(train_data)}
    if args.mode == "epoch":
        batches = min(args.epoch_batches, len(train_data))
        t0 = time.perf_counter()
        trainer._train_epoch(itertools.islice(train_data, batches), 0)
        per_batch = (time.perf_counter() - t0) / batches
        out.update({"epoch_seconds": per_batch * len(train_data), "timed_batches": batches,
                    "peak_rss_mb": peak_rss_mb()})
        return out
    budget = args.budget_min * 60
    start = time.perf_counter()
    best, best_epoch, stale, epoch_seconds, epochs, converged = float("-inf"), 0, 0, [], 0, False
    best_state = copy.deepcopy(model.state_dict())
    for epoch in range(args.max_epochs):
        t0 = time.perf_counter()
        trainer._train_epoch(train_data, epoch)
        epoch_seconds.append(time.perf_counter() - t0)
        score, _ = trainer._valid_epoch(valid_data)
        epochs = epoch + 1
        print(f"recbole epoch {epochs}: {epoch_seconds[-1]:.0f}s, valid NDCG@10 {score:.4f}", file=sys.stderr,
              flush=True)
        if score > best:
            best, best_epoch, stale = score, epochs, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
        if stale >= args.patience:
            converged = True
            break
        if time.perf_counter() - start > budget:
            break
    model.load_state_dict(best_state)
    uni = trainer.evaluate(test_data, load_best_model=False)
    seconds = time.perf_counter() - start
    full_config = _recbole_config(args, data_dir, "full")
    _, _, full_test = data_preparation(full_config, create_dataset(full_config))
    full = Trainer(full_config, model).evaluate(full_test, load_best_model=False)
    out.update({"seconds": seconds, "epochs": epochs, "best_epoch": best_epoch, "converged": converged,
                "epoch_seconds": min(epoch_seconds), "ndcg10_sampled": float(uni["ndcg@10"]),
                "hit10_sampled": float(uni["hit@10"]), "ndcg10_full": float(full["ndcg@10"]),
                "hit10_full": float(full["hit@10"]), "peak_rss_mb": peak_rss_mb()})
    return out


# ------------------------------------------------------------------------------------------------ parent


def recbole_python() -> Path:
    """The RecBole venv's interpreter, creating the venv on first use."""
    from prismrec.data.paths import output_dir

    venv = output_dir("cache") / "recbole-venv"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import recbole, torch; assert recbole.__version__ == '1.2.1'"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} (RecBole 1.2.1, numpy<2, pandas<2.3, torch {torch_version()} from the wheel cache)",
          flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"torch=={torch_version()}", *RECBOLE_PINS],
                   check=True)
    subprocess.run(probe, check=True)
    return python


def torch_version() -> str:
    from importlib import metadata

    return metadata.version("torch").split("+")[0]


def export_atomic(folder: Path) -> tuple[int, int, int]:
    """Our MovieLens sequences as RecBole's ``.inter`` file; timestamp = position, so orders agree."""
    from prismrec.data import load_sequences

    data = load_sequences("movielens-small")
    target = folder / DATASET
    target.mkdir(parents=True, exist_ok=True)
    rows = 0
    with (target / f"{DATASET}.inter").open("w", encoding="utf-8") as out:
        out.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for user, seq in enumerate(data.sequences):
            for position, item in enumerate(seq):
                out.write(f"u{user}\ti{int(item)}\t{position}\n")
                rows += 1
    return data.n_users, data.n_items, rows


def run_child(python: Path, side: str, mode: str, max_len: int, hidden: int, args: argparse.Namespace,
              data_dir: Path) -> dict:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONWARNINGS": "ignore"}
    cmd = [str(python), str(HERE), "--child", side, "--mode", mode, "--max-len", str(max_len), "--hidden",
           str(hidden), "--threads", str(args.threads), "--patience", str(args.patience), "--max-epochs",
           str(args.max_epochs), "--seed", str(args.seed), "--budget-min", str(args.recbole_budget_min),
           "--epoch-batches", str(args.epoch_batches), "--data-dir", str(data_dir), "--ours-loss", args.ours_loss,
           "--ours-window", args.ours_window]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(data_dir))
    if done.returncode != 0:
        raise RuntimeError(f"{side} {max_len}x{hidden} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["process_seconds"] = time.perf_counter() - started
    return result


def parse_grid(text: str) -> list[tuple[int, int, str]]:
    grid = []
    for part in text.split(","):
        size, _, mode = part.partition(":")
        max_len, hidden = (int(x) for x in size.lower().split("x"))
        grid.append((max_len, hidden, mode or "converge"))
    return grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="50x64,50x128,200x64,200x128")
    parser.add_argument("--patience", type=int, default=20)
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--recbole-budget-min", type=float, default=120.0,
                        help="wall-time cap of one RecBole training run (minutes)")
    parser.add_argument("--epoch-batches", type=int, default=40, help="RecBole batches timed in 'epoch' mode")
    parser.add_argument("--ours-loss", choices=["bce", "ce"], default="bce",
                        help="our loss (bce: the paper's; ce: the loss RecBole trains with)")
    parser.add_argument("--ours-window", choices=["last", "sliding"], default="last",
                        help="our training.window (sliding: every transition of a long history is a target, the "
                             "coverage RecBole gets from its prefix instances)")
    parser.add_argument("--recbole-from-log", type=Path, default=None,
                        help="take RecBole's side from a previous invocation's printed lines (same data, seed and "
                             "settings) instead of training it again; said so in the results")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--from-log", type=Path, default=None,
                        help="rewrite the results from the lines a previous invocation (same --grid) printed")
    # child-process options
    parser.add_argument("--child", choices=["ours", "recbole"])
    parser.add_argument("--mode", choices=["converge", "epoch"], default="converge")
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--budget-min", type=float, default=120.0)
    parser.add_argument("--data-dir", default=".")
    args = parser.parse_args()
    if args.child:
        result = child_ours(args) if args.child == "ours" else child_recbole(args)
        print(json.dumps(result))
        return

    grid = parse_grid(args.grid)
    if args.from_log is not None:
        results, total, data = results_from_log(args.from_log, grid)
        write_results(args, results, total, data)
        return
    reused: dict[str, dict] = {}
    if args.recbole_from_log is not None:
        previous, _, _ = results_from_log(args.recbole_from_log, grid)
        missing = [key for key in (f"{m}x{h}" for m, h, _ in grid) if "recbole" not in previous.get(key, {})]
        if missing:
            raise SystemExit(f"{args.recbole_from_log}: no RecBole result for {', '.join(missing)}")
        reused = {key: entry["recbole"] for key, entry in previous.items()}
    python = recbole_python() if not reused else Path(sys.executable)
    started = time.perf_counter()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="prismrec-recbole-") as tmp:
        data_dir = Path(tmp)
        n_users, n_items, rows = export_atomic(data_dir)
        print(f"exported {rows} interactions ({n_users} users, {n_items} items) as RecBole atomic files", flush=True)
        for max_len, hidden, mode in grid:
            key = f"{max_len}x{hidden}"
            ours = run_child(Path(sys.executable), "ours", mode, max_len, hidden, args, data_dir)
            print(f"{key} ours: {json.dumps(ours)}", flush=True)
            theirs = reused.get(key) or run_child(python, "recbole", mode, max_len, hidden, args, data_dir)
            print(f"{key} recbole: {json.dumps(theirs)}", flush=True)
            results[key] = {"mode": mode, "ours": ours, "recbole": theirs}
    total = time.perf_counter() - started + sum(side.get("process_seconds", 0.0) for side in reused.values())
    write_results(args, results, total, (n_users, n_items, rows))


def results_from_log(path: Path, grid: list[tuple[int, int, str]]) -> tuple[dict[str, dict], float, tuple]:
    modes = {f"{max_len}x{hidden}": mode for max_len, hidden, mode in grid}
    results: dict[str, dict] = {}
    data: tuple = (0, 0, 0)
    for line in path.read_text(encoding="utf-8").splitlines():
        found = re.match(r"^(\d+x\d+) (ours|recbole): (\{.*\})$", line)
        if found:
            results.setdefault(found[1], {"mode": modes[found[1]]})[found[2]] = json.loads(found[3])
        exported = re.match(r"^exported (\d+) interactions \((\d+) users, (\d+) items\)", line)
        if exported:
            data = (int(exported[2]), int(exported[3]), int(exported[1]))
    total = sum(side["process_seconds"] for entry in results.values() for k, side in entry.items() if k != "mode")
    return results, total, data


def write_results(args: argparse.Namespace, results: dict[str, dict], total: float,
                  data: tuple[int, int, int]) -> None:
    flat: dict[str, float | int | str | bool] = {"total_seconds": total, "threads": args.threads,
                                                 "patience": args.patience}
    for key, entry in results.items():
        for side in ("ours", "recbole"):
            if entry["mode"] == "epoch":
                entry[side].pop("converged", None)  # a two-epoch timing run says nothing about convergence
            for name, value in entry[side].items():
                flat[f"{key}_{side}_{name}"] = value
        flat[f"{key}_epoch_time_ratio"] = entry["ours"]["epoch_seconds"] / entry["recbole"]["epoch_seconds"]
        if entry["mode"] == "converge":
            theirs = entry["recbole"]
            flat[f"{key}_time_to_converge_ratio"] = entry["ours"]["seconds"] / theirs["seconds"]
            if not theirs["converged"]:
                # Early stopping cannot fire before best_epoch + patience epochs: a lower bound on RecBole's
                # time to converge, hence an upper bound on the ratio tighter than the budget's.
                floor = (theirs["best_epoch"] + args.patience) * theirs["epoch_seconds"]
                flat[f"{key}_recbole_min_seconds_to_converge"] = floor
                flat[f"{key}_time_to_converge_ratio_bound_from_patience"] = entry["ours"]["seconds"] / floor
    headline = "200x128" if "200x128" in results else list(results)[-1]
    converged_keys = [k for k, e in results.items() if e["mode"] == "converge"]
    converge_key = "200x128" if "200x128" in converged_keys else (converged_keys[-1] if converged_keys else None)
    flat["epoch_time_ratio"] = flat[f"{headline}_epoch_time_ratio"]
    flat["epoch_time_ratio_config"] = headline
    if converge_key is not None:
        entry = results[converge_key]
        flat["time_to_converge_ratio"] = flat[f"{converge_key}_time_to_converge_ratio"]
        if f"{converge_key}_time_to_converge_ratio_bound_from_patience" in flat:
            flat["time_to_converge_ratio_bound_from_patience"] = \
                flat[f"{converge_key}_time_to_converge_ratio_bound_from_patience"]
        flat["time_to_converge_config"] = converge_key
        flat["recbole_converged"] = bool(entry["recbole"]["converged"])
        flat["ndcg10_ours"] = entry["ours"]["ndcg10_sampled"]
        flat["ndcg10_recbole"] = entry["recbole"]["ndcg10_sampled"]
        flat["ndcg10_full_ours"] = entry["ours"]["ndcg10_full"]
        flat["ndcg10_full_recbole"] = entry["recbole"]["ndcg10_full"]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vs_recbole.json").write_text(json.dumps(flat, indent=2, sort_keys=True) + "\n")

    argv, skip = [], False
    for arg in sys.argv[1:]:  # the measuring command, without the options that only rewrite its results
        if skip or arg in ("--from-log", "--out"):
            skip = not skip
            continue
        argv.append(arg)
    command = " ".join(["OMP_WAIT_POLICY=PASSIVE", ".venv/bin/python", "benchmarks/vs_recbole.py", *argv])
    if args.recbole_from_log is not None:
        rewritten_recbole = [f"RecBole's rows are those of an earlier invocation (`--recbole-from-log "
                             f"{args.recbole_from_log.name}`: same data, seed, settings and machine); only our "
                             "side was trained again. Total wall time below is ours plus RecBole's recorded "
                             "process time.", ""]
    else:
        rewritten_recbole = []
    rewritten = rewritten_recbole + ([f"Tables rewritten from that run's printed lines (`{args.from_log.name}` "
                                      "beside this file) with `--from-log`; total wall time = sum of the measuring "
                                      "processes.", ""] if args.from_log else [])
    lines = ["# prismrec SASRec vs RecBole 1.2.1 SASRec on MovieLens (ml-latest-small)", "",
             f"Command: `{command}`", "", *rewritten,
             f"Machine: {platform.platform()}, {os.cpu_count()} CPUs shared with other work; both sides use "
             f"{args.threads} torch threads, seed {args.seed}, patience {args.patience} validation rounds "
             f"(one per epoch). Data: {data[2]} interactions, {data[0]} users, {data[1]} items, identical on "
             f"both sides. Total wall time {total / 60:.1f} min.", "",
             "| max_len x hidden | side | mode | epochs (best) | converged | time to converge s | s / epoch | "
             "test N@10 sampled | test H@10 sampled | test N@10 full | test H@10 full | peak RSS MB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key, entry in results.items():
        for side in ("ours", "recbole"):
            r = entry[side]
            if entry["mode"] == "converge":
                lines.append(f"| {key} | {side} | converge | {r['epochs']} ({r['best_epoch']}) | "
                             f"{'yes' if r['converged'] else 'no (budget)'} | {r['seconds']:.0f} | "
                             f"{r['epoch_seconds']:.1f} | {r['ndcg10_sampled']:.4f} | {r['hit10_sampled']:.4f} | "
                             f"{r['ndcg10_full']:.4f} | {r['hit10_full']:.4f} | {r['peak_rss_mb']:.0f} |")
            else:
                note = f" (first {r['timed_batches']} of {r['batches_per_epoch']} batches)" if side == "recbole" else ""
                lines.append(f"| {key} | {side} | epoch time | - | - | - | {r['epoch_seconds']:.1f}{note} | - | - | "
                             f"- | - | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Ratios (ours / RecBole; below 1 means ours is faster):", ""]
    for key, entry in results.items():
        parts = [f"epoch time {flat[f'{key}_epoch_time_ratio']:.3f}"]
        if entry["mode"] == "converge":
            parts.append(f"time to converge {flat[f'{key}_time_to_converge_ratio']:.3f}"
                         + ("" if entry["recbole"]["converged"] else " (RecBole stopped by the budget: its real "
                            "time to converge is longer, so the true ratio is lower still; early stopping with "
                            f"patience {args.patience} cannot fire before epoch "
                            f"{entry['recbole']['best_epoch'] + args.patience}, i.e. "
                            f"{flat[f'{key}_recbole_min_seconds_to_converge']:.0f} s, giving ratio <= "
                            f"{flat[f'{key}_time_to_converge_ratio_bound_from_patience']:.3f})"))
        lines.append(f"- {key}: " + ", ".join(parts))
    (args.out / "vs_recbole.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out / 'vs_recbole.md'}")


if __name__ == "__main__":
    main()
