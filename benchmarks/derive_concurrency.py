"""Derivation throughput against an OpenAI-compatible server with 200 ms latency: concurrency 1, 4 and 16.

Reference run: concurrency 1 in the same invocation. A local fake server (``tests/fake_openai_server.py``,
real HTTP on 127.0.0.1, in its own process like a real server) answers every request after ``--latency``
seconds, so the ideal speed-up at concurrency c is c. Items/s counts catalogue items through all three
routes (textual, visual with the poster attached as a base64 data URL, hybrid single prompt) divided by
the routes' wall time; the embedding step (one batched request per 256 texts) is not counted. Then the
concurrency-16 derivation is run again on its cache: ``calls_on_rerun`` must be 0.

    .venv/bin/python benchmarks/derive_concurrency.py

writes ``benchmarks/results/derive_concurrency.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from prismrec.semantics import DeriveOptions, Deriver, SemanticCache  # noqa: E402
from prismrec.semantics.backends.openai import OpenAIBackend, OpenAIChatOptions  # noqa: E402
from prismrec.semantics.embedders.openai import OpenAIEmbedder, OpenAIEmbeddingOptions  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "movielens-small"
RESULTS = REPO / "benchmarks" / "results"


class ServerProcess:
    """The fake server in a subprocess, controlled over HTTP (``/_control``, ``/_stats``)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.root = url.removesuffix("/v1")

    def reset_counts(self) -> None:
        httpx.post(self.root + "/_control", json={"reset_counts": True}).raise_for_status()

    def stats(self) -> dict:
        return httpx.get(self.root + "/_stats").json()


@contextmanager
def fake_server(latency: float) -> Iterator[ServerProcess]:
    process = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_openai_server.py"), "--port", "0",
                                "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline() if process.stdout else ""
        yield ServerProcess(line.strip().rsplit(" ", 1)[-1])
    finally:
        process.terminate()
        process.wait(timeout=10)


def make_catalogue(data_dir: Path, n_items: int) -> None:
    """A MovieLens-format folder with the first ``n_items`` movies that have posters (real posters)."""
    root = data_dir / "movielens-small"
    (root / "posters").mkdir(parents=True)
    with open(SHARED / "movies.csv", newline="") as handle:
        movies = [row for row in csv.DictReader(handle) if (SHARED / "posters" / f"{row['movieId']}.jpg").exists()]
    movies = movies[:n_items]
    with open(root / "movies.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["movieId", "title", "genres"])
        writer.writeheader()
        writer.writerows(movies)
    with open(root / "ratings.csv", "w") as handle:
        handle.write("userId,movieId,rating,timestamp\n")
        for rank, movie in enumerate(movies):
            handle.write(f"1,{movie['movieId']},4.0,{1_000_000 + rank}\n")
    for movie in movies:
        shutil.copyfile(SHARED / "posters" / f"{movie['movieId']}.jpg", root / "posters" / f"{movie['movieId']}.jpg")


async def derive_once(url: str, data_dir: Path, cache_path: Path, concurrency: int) -> tuple[float, int, int]:
    """Returns (route wall time in s, items, model calls)."""
    with SemanticCache(cache_path) as cache:
        backend = OpenAIBackend(OpenAIChatOptions(base_urls=[url], model="fake-vl", concurrency=concurrency,
                                                  max_retries=0), cache)
        embedder = OpenAIEmbedder(OpenAIEmbeddingOptions(base_urls=[url], batch_size=256, concurrency=4))
        deriver = Deriver(DeriveOptions(dataset="movielens-small", data_dir=data_dir, name=f"bench-c{concurrency}"),
                          backend, embedder, cache)
        try:
            report = await deriver.run()
        finally:
            await backend.aclose()
            await embedder.aclose()
    if not report.written or report.failures:
        raise RuntimeError(f"derivation at concurrency {concurrency} failed: {report.failures[:3]}")
    route_time = report.timings["generation_s"]
    return route_time, report.n_items, report.model_calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        os.environ["PRISMREC_HOME"] = str(scratch / "home")
        make_catalogue(scratch / "data", args.items)
        with fake_server(args.latency) as server:
            for level in args.levels:
                server.reset_counts()
                seconds, n, calls = asyncio.run(derive_once(server.url, scratch / "data", scratch / f"c{level}.sqlite",
                                                            level))
                rows.append({"concurrency": level, "items": n, "model_calls": calls, "seconds": seconds,
                             "items_per_s": n / seconds, "max_in_flight": server.stats()["max_in_flight"]})
                print(f"concurrency {level:>2}: {n} items, {calls} calls in {seconds:.2f}s = {n / seconds:.2f} items/s",
                      flush=True)
            server.reset_counts()
            top = args.levels[-1]
            asyncio.run(derive_once(server.url, scratch / "data", scratch / f"c{top}.sqlite", top))
            calls_on_rerun = int(server.stats()["counts"].get("requests", 0))
            print(f"rerun at concurrency {top}: {calls_on_rerun} requests")

    reference = rows[0]["items_per_s"]
    result: dict[str, float | int | str] = {
        "latency_s": args.latency,
        "items": args.items,
        **{f"items_per_s_at_{r['concurrency']}": round(r["items_per_s"], 3) for r in rows},
        **{f"speedup_at_{r['concurrency']}": round(r["items_per_s"] / reference, 3) for r in rows[1:]},
        "calls_on_rerun": calls_on_rerun,
        "model_calls_per_run": rows[0]["model_calls"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
    }
    command = f".venv/bin/python benchmarks/derive_concurrency.py --items {args.items} --latency {args.latency} " \
              f"--levels {' '.join(map(str, args.levels))}"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "derive_concurrency.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# derive_concurrency",
        "",
        f"Item-semantic derivation (three routes, openai backend) against the local fake OpenAI-compatible server "
        f"with {args.latency * 1000:.0f} ms latency per request; {args.items} MovieLens items with posters. "
        f"Reference: concurrency {args.levels[0]} in the same invocation (ideal speed-up = concurrency).",
        "",
        "| concurrency | model calls | generation time (s) | items/s | speed-up | max requests in flight |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['concurrency']} | {r['model_calls']} | {r['seconds']:.2f} | {r['items_per_s']:.2f} | "
                     f"{r['items_per_s'] / reference:.2f} | {r['max_in_flight']} |")
    lines += ["", f"Rerun of the concurrency-{args.levels[-1]} derivation on its cache: **{calls_on_rerun}** requests "
              f"(`calls_on_rerun`).", "", f"Machine: {result['machine']}, {result['date']}.", "", "Command:", "",
              f"    {command}", ""]
    (RESULTS / "derive_concurrency.md").write_text("\n".join(lines))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
