"""Start llama.cpp's ``llama-server`` (``make llama-server``) serving SmolLM2-135M (``make llm``) on 127.0.0.1.

Shared by ``tests/test_real_llama_server.py`` (marked ``real_server``) and ``benchmarks/derive_llama_server.py``.
:func:`missing` says what is absent (so a test can skip with the reason); :func:`serving` starts a server on a
free port with ``slots`` parallel slots, waits for ``/health`` and stops it afterwards.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
BINARY = Path(os.environ.get("PRISMREC_LLAMA_SERVER", REPO / ".venv" / "bin" / "llama-server"))


def smollm2_gguf() -> Path | None:
    try:
        from prismrec.llmrec.causal_lm import packaged_smollm2

        return packaged_smollm2()
    except (FileNotFoundError, ImportError):
        return None


def missing() -> str | None:
    """Why a real llama-server cannot run here, or None."""
    if not BINARY.is_file():
        return f"no llama-server at {BINARY} (make llama-server builds it, about 15 minutes)"
    if smollm2_gguf() is None:
        return "SmolLM2 GGUF not installed (make llm)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(slots: int = 4, threads: int = 2, ctx_per_slot: int = 2048, log: Path | None = None
            ) -> Iterator[str]:
    """A llama-server with ``slots`` parallel slots; yields its ``/v1`` base URL."""
    reason = missing()
    if reason is not None:
        raise RuntimeError(reason)
    port = free_port()
    command = [str(BINARY), "-m", str(smollm2_gguf()), "--host", "127.0.0.1", "--port", str(port),
               "--parallel", str(slots), "--ctx-size", str(ctx_per_slot * slots), "--threads", str(threads),
               "--metrics", "--no-webui"]
    out = open(log, "w") if log is not None else subprocess.DEVNULL
    process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode}: {' '.join(command)}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("llama-server did not become healthy within 120 s")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        if out is not subprocess.DEVNULL:
            out.close()


def predicted_tokens(base_url: str) -> float:
    """The server's own count of generated tokens so far (Prometheus ``llamacpp:tokens_predicted_total``)."""
    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=10).text
    match = re.search(r"^llamacpp:tokens_predicted_total\s+([0-9.e+]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else float("nan")


if __name__ == "__main__":  # manual use: python tests/llama_server.py [slots]
    with serving(int(sys.argv[1]) if len(sys.argv) > 1 else 4) as url:
        print(url, flush=True)
        signal.pause()
