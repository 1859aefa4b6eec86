"""Serving latency and throughput: plain SASRec vs DMESR exports behind `prismrec serve` on loopback.

Both models get the same backbone sizes (hidden 64, 2 blocks, max_len 50 by default) on MovieLens; DMESR
reads a 384-d semantics artefact (MiniLM's width; values random, which does not change the cost). The
models are exported untrained: latency depends on shapes, not on weight values. Each export is served by
its own `prismrec serve` process (one torch thread); a client sends ``POST /recommend`` requests (real
user histories, k=10) at concurrency 1, 8 and 32, a bounded number per setting, alternating the two
servers in small chunks so background load on the machine hits both alike. The reference run is SASRec in
the same invocation: ``p50_ratio_dmesr_vs_sasrec`` (concurrency 1) is the figure of merit (target <= 1.2).
Also reported: the in-process ranking cost without HTTP (``compute_p50_ms_*``).

    .venv/bin/python benchmarks/serving.py                  # 300 requests per model and concurrency
    .venv/bin/python benchmarks/serving.py --requests 60 --out /tmp/serving-check

Writes ``benchmarks/results/serving.{md,json}`` (keys ``p50_ratio_dmesr_vs_sasrec``, ``rps_dmesr_c32``,
``p99_ms_dmesr_c32`` and the same per model and concurrency).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 8, 32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def build_exports(work: Path, hidden: int, max_len: int, semantic_dim: int) -> tuple[Path, Path, list[list[str]]]:
    import torch
    from safetensors.numpy import save_file

    from prismrec.config import load_config
    from prismrec.models import MODELS
    from prismrec.serving.export import export_model
    from prismrec.training import prepare_split

    sizes = [f"model.hidden_size={hidden}", f"model.max_len={max_len}", "model.num_blocks=2", "model.dropout=0.0"]
    sasrec_cfg = load_config(None, ["model.name='sasrec'", "name='bench-sasrec'", *sizes])
    split = prepare_split(sasrec_cfg)
    dataset = split.dataset
    rng = np.random.default_rng(0)
    artefact = work / "semantics"
    artefact.mkdir(parents=True)
    matrices = {}
    for route in ("text", "visual", "hybrid", "original"):
        matrix = rng.normal(size=(dataset.n_items + 1, semantic_dim)).astype(np.float32)
        matrix[0] = 0
        matrices[route] = matrix
    save_file(matrices, str(artefact / "embeddings.safetensors"))
    manifest = {"name": "bench-random", "item_ids": list(map(str, dataset.item_ids))}
    (artefact / "items.json").write_text(json.dumps(manifest))
    dmesr_cfg = load_config(None, ["model.name='dmesr'", f"model.semantics='{artefact}'", "name='bench-dmesr'",
                                   *sizes])
    torch.manual_seed(0)
    out = []
    for config, name in ((sasrec_cfg, "sasrec"), (dmesr_cfg, "dmesr")):
        model = MODELS.get(config.model.name).build(config.model, split)
        out.append(export_model(model, config, dataset, work / f"export-{name}"))
    histories = [[str(dataset.item_ids[i]) for i in seq[-max_len:]] for seq in dataset.sequences]
    return out[0], out[1], histories


def compute_latency(export_dir: Path, histories: list[list[str]], n: int) -> float:
    """p50 ms of ranking one history in-process (no HTTP), one torch thread."""
    import torch

    from prismrec.serving import load_export

    torch.set_num_threads(1)
    export = load_export(export_dir)
    internal = [np.array([export.item_index[i] for i in h], dtype=np.int64) for h in histories]
    for h in internal[:10]:
        export.ranker.top_k([h], 10)
    times = []
    for i in range(n):
        start = time.perf_counter()
        export.ranker.top_k([internal[i % len(internal)]], 10)
        times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1000)


def start_server(export_dir: Path) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop("PRISMREC_SERVE_TOKEN", None)
    process = subprocess.Popen([sys.executable, "-m", "prismrec", "serve", str(export_dir), "--port", str(port),
                                "--threads", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server for {export_dir} exited with {process.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"server for {export_dir} did not start")


async def health_latency(url: str, n: int) -> float:
    """p50 ms of ``GET /health``: the HTTP + framework floor every request pays on this machine."""
    import httpx

    times = []
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for _ in range(n):
            start = time.perf_counter()
            (await client.get("/health")).raise_for_status()
            times.append(time.perf_counter() - start)
    return float(np.percentile(times, 50) * 1000)


async def load(url: str, bodies: list[dict], concurrency: int) -> tuple[list[float], float]:
    """Send ``bodies`` with ``concurrency`` requests in flight; (latencies in s, wall time in s)."""
    import httpx

    queue: asyncio.Queue[dict] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                start = time.perf_counter()
                response = await client.post("/recommend", json=body)
                latencies.append(time.perf_counter() - start)
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: {response.status_code} {response.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests per model and concurrency")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--semantic-dim", type=int, default=384)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from rich.console import Console

    console = Console()
    work = Path(tempfile.mkdtemp(prefix="prismrec-bench-serving-"))
    os.environ.setdefault("PRISMREC_HOME", str(work / "home"))
    sasrec_dir, dmesr_dir, histories = build_exports(work, args.hidden, args.max_len, args.semantic_dim)
    exports = {"sasrec": sasrec_dir, "dmesr": dmesr_dir}
    compute = {name: compute_latency(path, histories, 200) for name, path in exports.items()}
    rng = np.random.default_rng(1)
    servers = {name: start_server(path) for name, path in exports.items()}
    results: dict[str, float] = {}
    try:
        for _, url in servers.values():  # warm-up (first requests allocate)
            asyncio.run(load(url, [{"history": histories[i], "k": 10} for i in range(20)], 4))
        results["p50_ms_health_c1"] = round(asyncio.run(health_latency(servers["sasrec"][1], 100)), 3)
        results["load_average_start"] = round(os.getloadavg()[0], 2)
        for concurrency in CONCURRENCY:
            gathered: dict[str, tuple[list[float], float]] = {name: ([], 0.0) for name in servers}
            chunk = max(25, 4 * concurrency)  # small alternating chunks: background load hits both alike
            rounds = max(2, -(-args.requests // chunk))
            for round_ in range(rounds):
                order = list(servers) if round_ % 2 == 0 else list(reversed(servers))
                size = min(chunk, args.requests - round_ * chunk) if round_ * chunk < args.requests else chunk
                users = rng.integers(0, len(histories), size=size)
                bodies = [{"history": histories[u], "k": 10} for u in users]
                for name in order:
                    latencies, wall = asyncio.run(load(servers[name][1], bodies, concurrency))
                    gathered[name][0].extend(latencies)
                    gathered[name] = (gathered[name][0], gathered[name][1] + wall)
            for name, (latencies, wall) in gathered.items():
                ms = np.array(latencies) * 1000
                results[f"p50_ms_{name}_c{concurrency}"] = round(float(np.percentile(ms, 50)), 3)
                results[f"p99_ms_{name}_c{concurrency}"] = round(float(np.percentile(ms, 99)), 3)
                results[f"rps_{name}_c{concurrency}"] = round(len(latencies) / wall, 1)
                console.print(f"{name:7s} c={concurrency:<3d} p50 {results[f'p50_ms_{name}_c{concurrency}']:8.2f} ms"
                              f"  p99 {results[f'p99_ms_{name}_c{concurrency}']:8.2f} ms"
                              f"  {results[f'rps_{name}_c{concurrency}']:7.1f} req/s")
    finally:
        for process, _ in servers.values():
            process.terminate()
            process.wait(timeout=30)
    results["load_average_end"] = round(os.getloadavg()[0], 2)
    results["p50_ratio_dmesr_vs_sasrec"] = round(results["p50_ms_dmesr_c1"] / results["p50_ms_sasrec_c1"], 3)
    for concurrency in CONCURRENCY[1:]:
        results[f"p50_ratio_dmesr_vs_sasrec_c{concurrency}"] = round(
            results[f"p50_ms_dmesr_c{concurrency}"] / results[f"p50_ms_sasrec_c{concurrency}"], 3)
    results.update({f"compute_p50_ms_{k}": round(v, 3) for k, v in compute.items()})
    results["compute_p50_ratio_dmesr_vs_sasrec"] = round(compute["dmesr"] / compute["sasrec"], 3)
    results.update({"requests_per_setting": args.requests, "hidden_size": args.hidden, "max_len": args.max_len,
                    "semantic_dim": args.semantic_dim, "n_items": 9724, "cpu_count": os.cpu_count() or 0})
    console.print(f"p50 ratio DMESR / SASRec (concurrency 1): {results['p50_ratio_dmesr_vs_sasrec']:.3f} "
                  f"(target <= 1.2); in-process ranking {compute['dmesr']:.2f} vs {compute['sasrec']:.2f} ms")
    write_results(args, results)


def write_results(args: argparse.Namespace, results: dict[str, float]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "serving.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    rows = []
    for concurrency in CONCURRENCY:
        for name in ("sasrec", "dmesr"):
            key = f"{name}_c{concurrency}"
            rows.append(f"| {name} | {concurrency} | {results[f'p50_ms_{key}']:.2f} | "
                        f"{results[f'p99_ms_{key}']:.2f} | {results[f'rps_{key}']:.1f} |")
    command = " ".join(["python", "benchmarks/serving.py", *sys.argv[1:]])
    text = f"""# Serving benchmark: DMESR vs plain SASRec behind `prismrec serve`

Command: `{command}` ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, shared; Python
{platform.python_version()}). Each model is served by its own `prismrec serve` process on 127.0.0.1 with one
torch thread; the client (httpx, same machine) sends `POST /recommend` with real MovieLens histories (last
{args.max_len} items), k=10, {args.requests} requests per model and concurrency, sent in alternating chunks
of max(25, 4 x concurrency) requests.
Models: hidden {args.hidden}, 2 blocks, max_len {args.max_len}, 9,724 items; DMESR with {args.semantic_dim}-d
semantic inputs (untrained weights: latency depends on shapes only).

| model | concurrency | p50 ms | p99 ms | req/s |
| --- | ---: | ---: | ---: | ---: |
{chr(10).join(rows)}

- **p50 ratio DMESR / SASRec at concurrency 1: {results['p50_ratio_dmesr_vs_sasrec']:.3f}** (target <= 1.2:
  {"met" if results['p50_ratio_dmesr_vs_sasrec'] <= 1.2 else "not met"} in this run);
  at 8: {results['p50_ratio_dmesr_vs_sasrec_c8']:.3f}, at 32: {results['p50_ratio_dmesr_vs_sasrec_c32']:.3f}.
- In-process ranking of one history (no HTTP, one thread), p50: DMESR {results['compute_p50_ms_dmesr']:.2f} ms,
  SASRec {results['compute_p50_ms_sasrec']:.2f} ms (ratio {results['compute_p50_ratio_dmesr_vs_sasrec']:.3f}).
  DMESR's item side is precomputed at export (no adapters at serving time); its two views run through the
  shared backbone as one stacked batch, and scoring is one product with the concatenated [coarse : fine]
  item matrix plus `torch.topk`.
- HTTP floor: `GET /health` p50 {results['p50_ms_health_c1']:.2f} ms. The machine was shared with other
  jobs: 1-minute load average {results['load_average_start']:.1f} at the start and
  {results['load_average_end']:.1f} at the end (2 cores), so absolute numbers are pessimistic and noisy;
  the ratios compare the two models under the same conditions (alternating chunks).
- The ratio at concurrency 1 is the in-process gap (DMESR's cross-attention, second view and 2d-wide item
  matrix) over a shared HTTP floor: the busier the machine, the larger the floor and the smaller the ratio;
  on an idle machine with a ~1 ms floor it would be about (1 + DMESR compute) / (1 + SASRec compute).
- Each server handles HTTP on its event loop and ranks on one worker thread per export; requests that arrive
  while the model is busy are ranked together in one batch (micro-batching, no added wait), so throughput
  at 8 and 32 in flight is limited by the 2 shared cores and the extra latency is queueing.
"""
    (args.out / "serving.md").write_text(text)


if __name__ == "__main__":
    main()
