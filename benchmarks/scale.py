"""Scale: synthetic generic-format logs of 1M, 3M and 10M interactions, SASRec and DMESR one epoch each.

Data (seeded, ``generate``): Zipf item popularity (p_i ~ (i + 10)^-0.9), log-normal history lengths (median
14, sigma 0.9, at least 3), 20 interactions per user on average and a catalogue of N / 50 items (1M: 50k users
x 20k items; 10M: 500k users x 200k items, the shape of the issue's 9.8M example), written as Parquet in the
generic format. Item ``i`` has the same id and text at every size, so the catalogues are nested.

Semantics for DMESR: one generic-catalogue ``prismrec derive`` with the offline ``describe`` backend and the
packaged MiniLM embedder (the cheapest real route without an LLM server: the textual route is the item's
attributes, there are no images) over the largest catalogue; every smaller size reads its rows by external id.

Per size, in its own process (a failed size costs only itself; finished sizes are kept in
``benchmarks/results/scale_parts/`` and skipped on a rerun unless ``--force``): load the data (load s), build
the trainer (model, semantics, the sampled protocol's negatives: setup s), one training epoch per model
(SASRec hidden 64, max_len 50, batch 1024, BCE; DMESR the same backbone; ``--max-batches dmesr@10m=N`` times
only the first N batches and scales to the epoch, for a machine too slow for the whole), then the test stage
evaluated on the bounded full-ranking user sample (every user up to 50,000, else a seeded 50,000): the sampled
protocol and full ranking over the whole catalogue, streamed in chunks (eval s). Peak RSS is the size's
process high-water mark.

    flock /tmp/prismrec-bench.lock .venv/bin/python benchmarks/scale.py                  # 1m,3m,10m
    .venv/bin/python benchmarks/scale.py --sizes 1m --out scale_dev                        # quick check

Writes ``benchmarks/results/scale.{md,json}`` (keys ``epoch_s_per_m_1m``, ``epoch_s_per_m_10m``, ``eval_s_10m``,
``peak_rss_gb_10m`` for SASRec, the same with a ``dmesr_`` prefix, and per-size details).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, write_results

REPO = Path(__file__).resolve().parents[1]
SIZES = {"100k": 100_000, "1m": 1_000_000, "3m": 3_000_000, "10m": 10_000_000}  # 100k: quick checks
WORDS = ("steel blue ceramic travel mini classic smart wireless organic leather wooden compact deluxe vintage "
         "portable kitchen garden office outdoor kids pro ultra silent eco soft").split()
NOUNS = ("mug kettle lamp chair backpack speaker charger jacket notebook bottle pan blender headphones sofa "
         "camera watch keyboard tent drill brush").split()
CATEGORIES = ("home", "kitchen", "electronics", "outdoors", "fashion", "office", "toys", "tools", "sports", "books")


def n_items_for(n_interactions: int) -> int:
    return n_interactions // 50


def item_table(n_items: int) -> dict[str, list[str]]:
    """Item ``i``'s id and text depend on ``i`` alone (nested catalogues across sizes): the first ``n_items``
    rows of one seeded table of the largest catalogue (or of ``n_items`` rows beyond it)."""
    rng = np.random.default_rng(7)
    rows = max(n_items, n_items_for(max(SIZES.values())))
    w = rng.integers(0, len(WORDS), size=(rows, 2))[:n_items]
    n = rng.integers(0, len(NOUNS), size=rows)[:n_items]
    c = rng.integers(0, len(CATEGORIES), size=rows)[:n_items]
    price = rng.integers(3, 400, size=rows)[:n_items]
    return {
        "item": [f"i{i}" for i in range(n_items)],
        "title": [f"{WORDS[a]} {WORDS[b]} {NOUNS[k]} {i}" for i, (a, b), k in zip(range(n_items), w, n, strict=True)],
        "category": [CATEGORIES[k] for k in c],
        "price": [f"{p} EUR" for p in price],
    }


def generate(folder: Path, n_interactions: int, seed: int = 0) -> dict[str, int]:
    """Write ``interactions.parquet`` and ``items.parquet`` (generic format) with exactly ``n_interactions``."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    n_items = n_items_for(n_interactions)
    lengths = np.maximum(3, np.round(rng.lognormal(np.log(14.0), 0.9, size=n_interactions // 10))).astype(np.int64)
    cut = int(np.searchsorted(np.cumsum(lengths), n_interactions))
    lengths = lengths[:cut + 1]
    lengths[-1] -= int(lengths.sum() - n_interactions)
    if lengths[-1] < 3:  # fold a too-short last user into the previous one
        lengths[-2] += lengths[-1]
        lengths = lengths[:-1]
    n_users = len(lengths)
    p = 1.0 / np.power(np.arange(n_items) + 10.0, 0.9)
    items = rng.choice(n_items, size=n_interactions, p=p / p.sum())
    users = np.repeat(np.arange(n_users), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    timestamps = 1_600_000_000 + rng.integers(0, 10_000_000, size=n_users).repeat(lengths) + (
        np.arange(n_interactions) - starts) * 3600
    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame({"user": pd.Series([f"u{u}" for u in range(n_users)]).values[users],
                  "item": np.array([f"i{i}" for i in range(n_items)])[items],
                  "timestamp": timestamps}).to_parquet(folder / "interactions.parquet", index=False)
    pd.DataFrame(item_table(n_items)).to_parquet(folder / "items.parquet", index=False)
    return {"users": n_users, "items": n_items, "interactions": n_interactions}


def write_catalogue(folder: Path, n_items: int) -> None:
    """The derivation's dataset: every item of the largest catalogue, each in one interaction (the generic
    loader keeps only items that occur in the log)."""
    import pandas as pd

    folder.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(item_table(n_items)).to_csv(folder / "items.csv", index=False)
    ids = np.arange(n_items)
    pd.DataFrame({"user": [f"c{i // 10}" for i in ids], "item": [f"i{i}" for i in ids],
                  "timestamp": 1_600_000_000 + ids}).to_csv(folder / "interactions.csv", index=False)


def derive_semantics(work: Path, n_items: int) -> tuple[str, float]:
    """``prismrec derive generic`` (describe backend, MiniLM) over the catalogue; reused when present."""
    name = f"scale-catalogue-{n_items}"
    artefact = work / "home" / "semantics" / name
    timing = work / "home" / "semantics" / f"{name}.derive_seconds"  # beside the artefact, not inside it
    if (artefact / "embeddings.safetensors").exists():
        return str(artefact), float(timing.read_text()) if timing.exists() else float("nan")
    data_dir = work / "catalogue"
    write_catalogue(data_dir / "generic", n_items)
    t0 = time.perf_counter()
    env = {**os.environ, "PRISMREC_HOME": str(work / "home")}
    subprocess.run([str(REPO / ".venv/bin/prismrec"), "derive", "generic", "--data-dir", str(data_dir),
                    "--name", name], check=True, env=env)
    seconds = time.perf_counter() - t0
    timing.write_text(f"{seconds:.1f}\n")
    return str(artefact), seconds


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # Linux: KiB


def run_size(size: str, work: Path, semantics: str, models: list[str], threads: int,
             max_batches: dict[str, int]) -> dict[str, Any]:
    """One size, in this process: generate (if needed), load, one epoch and the test evaluation per model."""
    import torch

    from prismrec.data.loaders import load_sequences
    from prismrec.data.split import LeaveOneOutSplit

    torch.set_num_threads(threads)
    n = SIZES[size]
    data_dir = work / "data"
    folder = f"scale-{size}"
    if not (data_dir / folder / "items.parquet").exists():
        t0 = time.perf_counter()
        shape = generate(data_dir / folder, n)
        print(f"[{size}] generated {shape} in {time.perf_counter() - t0:.1f} s", flush=True)
    options = {"interactions_file": "interactions.parquet", "items_file": "items.parquet"}
    t0 = time.perf_counter()
    sequences = load_sequences("generic", data_dir, options=options, folder=folder)
    split = LeaveOneOutSplit(sequences)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"size": size, "interactions": int(sum(len(s) for s in sequences.sequences)),
                           "users": sequences.n_users, "items": sequences.n_items, "load_s": load_s,
                           "rss_after_load_gb": peak_rss_gb()}
    print(f"[{size}] loaded {out['interactions']:,} interactions ({out['users']:,} users x {out['items']:,} items) "
          f"in {load_s:.1f} s", flush=True)
    backbone = {"hidden_size": 64, "max_len": 50, "num_blocks": 2, "num_heads": 1, "dropout": 0.2}
    model_sections = {"sasrec": {"name": "sasrec", **backbone},
                      "dmesr": {"name": "dmesr", "backbone": "sasrec", "semantics": semantics, "id_embedding": True,
                                "cross_attention_residual": True, **backbone}}
    for name in models:
        try:
            out[name] = run_model(name, size, model_sections[name], split, data_dir, folder, options, work, threads,
                                  out["interactions"], max_batches.get(f"{name}@{size}", max_batches.get(name)))
        except Exception as error:
            out[name] = {"error": f"{type(error).__name__}: {error}"}
            print(f"[{size}] {name} failed: {out[name]['error']}", flush=True)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def run_model(name: str, size: str, section: dict[str, Any], split: Any, data_dir: Path, folder: str,
              options: dict[str, str], work: Path, threads: int, interactions: int,
              max_batches: int | None = None) -> dict[str, Any]:
    import torch

    from prismrec.config import RunConfig
    from prismrec.models import MODELS
    from prismrec.training.trainer import Trainer, TrainingLoss

    config = RunConfig.model_validate({
        "name": f"scale-{size}-{name}", "seed": 42,
        "data": {"dataset": "generic", "data_dir": str(data_dir), "folder": folder, "options": options},
        "model": MODELS.get(name).Config.model_validate(section),
        "training": {"batch_size": 1024, "max_epochs": 1, "loss": "bce", "num_threads": threads},
        "evaluation": {"batch_size": 1024},
    })
    t0 = time.perf_counter()
    trainer = Trainer(config, split=split, run_dir=work / "runs" / config.name, quiet=True)
    setup_s = time.perf_counter() - t0
    optimizer = torch.optim.Adam(trainer.model.parameters(), lr=config.training.lr)
    step = TrainingLoss(trainer.model, config.training.loss)
    users = trainer._train_users()
    batch_size = config.training.batch_size
    n_batches = -(-len(users) // batch_size)
    t0 = time.perf_counter()
    if max_batches is None or max_batches >= n_batches:
        loss = trainer._epoch(step, optimizer, users)  # the Trainer's own epoch
        done = n_batches
    else:  # the same loop as Trainer._epoch, stopped after max_batches batches of a random visiting order
        trainer.model.train()
        order = trainer.order_rng.permutation(users)[: max_batches * batch_size]
        losses = []
        for start in range(0, len(order), batch_size):
            batch = trainer.model.training_batch([trainer.train_rows[u] for u in order[start:start + batch_size]],
                                                 trainer.batch_rng)
            value = step(trainer._to_device(batch))
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
        loss, done = float(np.mean(losses)), max_batches
    measured_s = time.perf_counter() - t0
    epoch_s = measured_s * n_batches / done  # a partial epoch is scaled to the whole one (and says so)
    # Evaluation: the test stage, both protocols on the full-ranking user sample (every user up to 50,000).
    full_eval = trainer.evaluators.full
    assert full_eval is not None
    t0 = time.perf_counter()
    sampled = trainer.evaluators.sampled.evaluate(trainer.model, "test", full_eval.users).summary()
    sampled_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    full = full_eval.evaluate(trainer.model, "test").summary()
    full_s = time.perf_counter() - t0
    millions = interactions / 1e6
    result = {"setup_s": setup_s, "epoch_s": epoch_s, "epoch_s_per_m": epoch_s / millions,
              "batches_measured": done, "batches_per_epoch": n_batches, "measured_s": measured_s,
              "loss": loss, "eval_sampled_s": sampled_s, "eval_full_s": full_s, "eval_s": sampled_s + full_s,
                 "full_ranking": full_eval.record(), "test_sampled_ndcg10": sampled["ndcg@10"],
                 "test_full_ndcg10": full["ndcg@10"], "test_full_hit10": full["hit@10"],
                 "rss_gb": peak_rss_gb()}
    print(f"[{size}] {name}: setup {setup_s:.1f} s, epoch {epoch_s:.1f} s ({epoch_s / millions:.1f} s/M; "
          f"{done} of {n_batches} batches timed), "
          f"eval sampled {sampled_s:.1f} s + full {full_s:.1f} s ({full_eval.record()['users']:,} users), "
          f"test N@10 sampled {sampled['ndcg@10']:.4f} full {full['ndcg@10']:.4f}, "
          f"peak RSS {peak_rss_gb():.2f} GB", flush=True)
    return result


def summarise(parts: dict[str, dict[str, Any]], models: list[str], derive_s: float | None) -> tuple[dict, str]:
    flat: dict[str, Any] = {"cpu_threads": parts[next(iter(parts))].get("threads"), "machine": platform.machine()}
    if derive_s is not None:
        flat["derive_s"] = round(derive_s, 1)
    rows = ["| size | users | items | model | load s | setup s | epoch s | s per M | eval s (sampled + full) | "
            "full-ranking users | peak RSS GB | test N@10 sampled / full |", "|---|---:|---:|---|---:|---:|---:|---:|"
            "---:|---:|---:|---|"]
    for size, part in parts.items():
        for name in models:
            if name not in part or "error" in part[name]:
                continue
            m = part[name]
            prefix = "" if name == "sasrec" else f"{name}_"
            flat[f"{prefix}epoch_s_per_m_{size}"] = round(m["epoch_s_per_m"], 2)
            flat[f"{prefix}epoch_s_{size}"] = round(m["epoch_s"], 1)
            flat[f"{prefix}eval_s_{size}"] = round(m["eval_s"], 1)
            flat[f"{prefix}eval_full_s_{size}"] = round(m["eval_full_s"], 1)
            flat[f"{prefix}setup_s_{size}"] = round(m["setup_s"], 1)
            timed = "" if m["batches_measured"] == m["batches_per_epoch"] else (
                f" ({m['batches_measured']} of {m['batches_per_epoch']} batches timed)")
            rows.append(f"| {size} | {part['users']:,} | {part['items']:,} | {name} | {part['load_s']:.1f} | "
                        f"{m['setup_s']:.1f} | {m['epoch_s']:.1f}{timed} | {m['epoch_s_per_m']:.1f} | "
                        f"{m['eval_s']:.1f} ({m['eval_sampled_s']:.1f} + {m['eval_full_s']:.1f}) | "
                        f"{m['full_ranking']['users']:,} of {m['full_ranking']['of']:,} | {m['rss_gb']:.2f} | "
                        f"{m['test_sampled_ndcg10']:.4f} / {m['test_full_ndcg10']:.4f} |")
        flat[f"load_s_{size}"] = round(part["load_s"], 1)
        flat[f"peak_rss_gb_{size}"] = round(part["peak_rss_gb"], 2)
    goals = []
    for prefix, label in (("", "SASRec"), ("dmesr_", "DMESR")):
        a, b = flat.get(f"{prefix}epoch_s_per_m_1m"), flat.get(f"{prefix}epoch_s_per_m_10m")
        if a and b:
            flat[f"{prefix}cost_ratio_10m_vs_1m"] = round(b / a, 3)
            goals.append(f"- {label}: s per million at 10M / at 1M = {b / a:.2f} (goal <= 1.3: "
                         f"{'met' if b / a <= 1.3 else 'NOT met'})")
        e = flat.get(f"{prefix}eval_s_10m")
        if e is not None:
            goals.append(f"- {label}: evaluation at 10M {e:.0f} s (goal < 600 s: {'met' if e < 600 else 'NOT met'})")
    rss = flat.get("peak_rss_gb_10m")
    if rss is not None:
        goals.append(f"- peak RSS at 10M (both models, one process) {rss:.2f} GB (goal < 8 GB: "
                     f"{'met' if rss < 8 else 'NOT met'})")
    return flat, "\n".join(rows) + "\n\nGoals:\n\n" + "\n".join(goals)


def parse_caps(text: str) -> dict[str, int]:
    caps: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"--max-batches: {item!r} is not MODEL[@SIZE]=N with N >= 1")
        caps[key] = int(value)
    return caps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="1m,3m,10m")
    parser.add_argument("--models", default="sasrec,dmesr")
    parser.add_argument("--work", type=Path, default=Path("/tmp/prismrec-scale"), help="data, semantics, runs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="scale", help="results name (benchmarks/results/NAME.{md,json})")
    parser.add_argument("--force", action="store_true", help="rerun sizes whose part result exists")
    parser.add_argument("--max-batches", default="", help="time only this many batches of an epoch and scale "
                        "to the whole epoch, e.g. 'dmesr@10m=120,dmesr@3m=120' (MODEL or MODEL@SIZE); default: "
                        "whole epochs")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one size in this process
    parser.add_argument("--semantics", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; known: {', '.join(SIZES)}")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["PRISMREC_HOME"] = str(args.work / "home")
    parts_dir = RESULTS / f"{args.out}_parts"
    if args.one:
        result = run_size(args.one, args.work, args.semantics, models, args.threads, parse_caps(args.max_batches))
        result["threads"] = args.threads
        parts_dir.mkdir(parents=True, exist_ok=True)
        (parts_dir / f"{args.one}.json").write_text(json.dumps(result, indent=2) + "\n")
        return
    semantics, derive_s = "", None
    if "dmesr" in models:
        semantics, derive_s = derive_semantics(args.work, n_items_for(max(SIZES[s] for s in sizes)))
        print(f"semantics: {semantics} (derived in {derive_s:.0f} s)", flush=True)
    parts: dict[str, dict[str, Any]] = {}
    for size in sizes:
        path = parts_dir / f"{size}.json"
        if not path.exists() or args.force:
            proc = subprocess.run([sys.executable, __file__, "--one", size, "--semantics", semantics, "--models",
                                   ",".join(models), "--work", str(args.work), "--threads", str(args.threads),
                                   "--out", args.out, "--max-batches", args.max_batches])
            if proc.returncode != 0:
                print(f"[{size}] failed (exit {proc.returncode}); the other sizes go on", flush=True)
                continue
        parts[size] = json.loads(path.read_text())
    if not parts:
        raise SystemExit("no size finished")
    flat, table = summarise(parts, models, derive_s)
    notes = (f"Synthetic generic-format data (see the script's docstring), {parts[next(iter(parts))]['threads']} "
             f"torch threads on a shared 2-core machine. Epoch: one pass over every user (window 'last', "
             f"BCE, batch 1024); where the table says so, only the first batches of the epoch's random visiting "
             f"order were timed and the time scaled to the whole epoch (same per-batch work). Eval: the test "
             f"stage on the full-ranking user sample (`evaluation.full_ranking_users` default: all users up to "
             f"50,000, then a seeded sample of 50,000), sampled protocol plus full ranking streamed over the "
             f"whole catalogue in chunks of 16,384 items. Setup: model, semantics and the "
             f"sampled protocol's negatives (drawn once per dataset, cached). DMESR semantics: derived once "
             f"for the largest catalogue ({n_items_for(max(SIZES[s] for s in sizes)):,} items) in "
             f"{derive_s or 0:.0f} s (an earlier invocation's time when reused). Sizes whose part result "
             f"existed were measured by an earlier invocation with the same options. Command used: "
             f"`{command_line()}`.")
    write_results(args.out, flat, table, notes)
    print(table)


if __name__ == "__main__":
    main()
