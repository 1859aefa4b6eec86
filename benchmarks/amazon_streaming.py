"""Streaming read of an Amazon 2018 reviews dump: throughput and peak memory on a generated 1M-line file.

Reference run in the same invocation: a bare ``for line in gzip file: json.loads(line)`` loop (the least
any JSON-lines reader must do), so ``ratio_vs_json_loads`` says what the loader's checks and table
building cost on this machine. Memory: each measurement runs in a fresh process and reports its own peak
RSS; the loader is measured on the full file and on its first quarter, and the growth in peak RSS is
compared with the growth of the interactions table itself (pandas deep memory usage). A reader that held
the file or all parsed records in memory would grow by far more than the table.

    .venv/bin/python benchmarks/amazon_streaming.py            # 1M lines (~0.5 GB uncompressed)
    .venv/bin/python benchmarks/amazon_streaming.py --lines 200000 --out /tmp/x   # quick check

Writes ``benchmarks/results/amazon_streaming.{json,md}`` (keys include ``lines_per_s`` and ``peak_rss_mb``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
WORDS = ("great game fun graphics story controller boss level multiplayer online campaign sound music "
         "price delivery disc works kids love hours worth buy again broken refund classic sequel").split()


def generate(path: Path, lines: int, seed: int = 0) -> None:
    """An Amazon 2018 reviews file with realistic fields and text lengths, gzip level 1."""
    rng = random.Random(seed)
    n_users, n_items = max(lines // 5, 1), max(lines // 20, 1)
    with gzip.open(path, "wt", compresslevel=1, encoding="utf-8") as out:
        for _ in range(lines):
            ts = 1_000_000_000 + rng.randrange(500_000_000)
            record = {
                "overall": float(rng.randint(1, 5)), "verified": rng.random() < 0.8,
                "reviewTime": time.strftime("%m %d, %Y", time.gmtime(ts)),
                "reviewerID": f"A{rng.randrange(n_users):013d}", "asin": f"B{rng.randrange(n_items):09d}",
                "reviewerName": "Some Gamer", "reviewText": " ".join(rng.choices(WORDS, k=rng.randint(10, 80))),
                "summary": " ".join(rng.choices(WORDS, k=4)), "unixReviewTime": ts,
            }
            out.write(json.dumps(record) + "\n")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def child(mode: str, path: Path, limit: int | None) -> dict[str, float]:
    """Run one measurement in this (fresh) process."""
    import pandas  # noqa: F401  (imports count towards the baseline, not the measurement)
    import pyarrow  # noqa: F401

    from prismrec.data.amazon import AmazonOptions, AmazonReviews

    if limit is not None:  # the first ``limit`` lines as their own file
        small = path.with_name(f"first{limit}.json.gz")
        with gzip.open(path, "rb") as src, gzip.open(small, "wb", compresslevel=1) as dst:
            for n, line in enumerate(src):
                if n >= limit:
                    break
                dst.write(line)
        path = small
    import_rss = peak_rss_mb()
    start = time.perf_counter()
    table_mb, rows = 0.0, 0
    if mode == "json_loads":
        lines = 0
        with gzip.open(path, "rb") as fh:
            for line in fh:
                json.loads(line)
                lines += 1
    else:
        loader = AmazonReviews(AmazonOptions())
        frame = loader.read_reviews(path)
        lines, rows = loader.report.files[0].lines, len(frame)
        table_mb = float(frame.memory_usage(deep=True).sum()) / 2**20
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "lines": lines, "rows": rows, "peak_rss_mb": peak_rss_mb(),
            "import_rss_mb": import_rss, "table_mb": table_mb}


def measure(mode: str, path: Path, limit: int | None = None) -> dict[str, float]:
    args = [sys.executable, __file__, "--child", mode, "--file", str(path)]
    if limit is not None:
        args += ["--limit", str(limit)]
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_markdown(result: dict[str, object], command: str, out: Path) -> None:
    rows = "\n".join(f"| `{key}` | {value} |" for key, value in result.items())
    (out / "amazon_streaming.md").write_text(f"""# Amazon streaming read

Generated Amazon 2018 reviews file (gzip level 1, realistic fields and review text), read with
`AmazonReviews.read_reviews` (the loader's full path: streaming gzip, JSON per line, field checks,
interned id codes, duplicate removal, Arrow string columns). Reference in the same invocation: a bare
`json.loads` loop over the same file. Memory: peak RSS of a fresh process per run; the full file and its
first quarter are compared, so `rss_growth_mb` (peak RSS, full minus quarter) can be set against
`table_growth_mb` (the interactions table's own growth, pandas deep memory usage). Timings are the faster
of `repeats` alternating runs on a machine shared with other work (see `load_average_1min_at_end`):
compare `ratio_vs_json_loads`, not absolute speeds, across runs.

| metric | value |
|---|---|
{rows}

Reading the memory numbers: the file is never held whole and no parsed record outlives its line. What
grows with the file is the table itself (~48 bytes a row: two Arrow `large_string` columns and an int64)
plus, while it is built, 16 bytes a row of integer codes, one copy of each distinct user and item id and
the sort used to find duplicates; hence a peak-RSS growth of about twice the table's own growth, linear
in the number of rows (a reader that kept the decompressed text or the parsed dicts would need several
hundred bytes to kilobytes a row).

Command: `{command}`
""", "utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=1_000_000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--repeats", type=int, default=2, help="alternating reference/loader pairs; best kept")
    parser.add_argument("--child", choices=["json_loads", "loader"], help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.file, args.limit)))
        return

    with tempfile.TemporaryDirectory(prefix="prismrec-bench-") as tmp:
        path = Path(tmp) / "Video_Games.json.gz"
        t0 = time.perf_counter()
        generate(path, args.lines)
        generate_s = time.perf_counter() - t0
        gzip_mb = path.stat().st_size / 2**20
        print(f"generated {args.lines:,} lines ({gzip_mb:.0f} MB gzipped) in {generate_s:.1f}s")
        # Alternate reference and loader runs and keep the faster of each pair: the machine is shared.
        runs: dict[str, list[dict[str, float]]] = {"json_loads": [], "loader": []}
        for _ in range(args.repeats):
            for mode in ("json_loads", "loader"):
                runs[mode].append(measure(mode, path))
                print(f"{mode}: {runs[mode][-1]['seconds']:.1f}s, peak RSS {runs[mode][-1]['peak_rss_mb']:.0f} MB")
        reference = min(runs["json_loads"], key=lambda r: r["seconds"])
        full = min(runs["loader"], key=lambda r: r["seconds"])
        quarter = measure("loader", path, args.lines // 4)
        print(f"loader on a quarter: {quarter['seconds']:.1f}s, peak RSS {quarter['peak_rss_mb']:.0f} MB")

    peak_rss = max(r["peak_rss_mb"] for r in runs["loader"])
    rss_growth = peak_rss - quarter["peak_rss_mb"]
    table_growth = full["table_mb"] - quarter["table_mb"]
    result = {
        "lines": int(full["lines"]),
        "rows": int(full["rows"]),
        "gzip_mb": round(gzip_mb, 1),
        "lines_per_s": round(full["lines"] / full["seconds"]),
        "reference_json_loads_lines_per_s": round(reference["lines"] / reference["seconds"]),
        "ratio_vs_json_loads": round(reference["seconds"] / full["seconds"], 3),
        "peak_rss_mb": round(peak_rss, 1),
        "peak_rss_mb_quarter_file": round(quarter["peak_rss_mb"], 1),
        "import_rss_mb": round(full["import_rss_mb"], 1),
        "table_mb": round(full["table_mb"], 1),
        "table_mb_quarter_file": round(quarter["table_mb"], 1),
        "rss_growth_mb": round(rss_growth, 1),
        "table_growth_mb": round(table_growth, 1),
        "rss_growth_over_table_growth": round(rss_growth / table_growth, 2) if table_growth > 0 else None,
        "reference_peak_rss_mb": round(reference["peak_rss_mb"], 1),
        "repeats": args.repeats,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }
    command = "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/amazon_streaming.py"
    command += f" --lines {args.lines}" if args.lines != 1_000_000 else ""
    command += f" --repeats {args.repeats}" if args.repeats != 2 else ""
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "amazon_streaming.json").write_text(json.dumps(result, indent=1) + "\n", "utf-8")
    write_markdown(result, command, args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
