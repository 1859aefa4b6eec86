"""``openai``: any OpenAI-compatible chat-completions server (vLLM, Ollama, llama.cpp server, OpenAI).

Images are sent inside the user message as base64 ``data:`` URLs (``image_url`` content parts, image
first), and the prompt's ``{image_path}`` placeholder then reads "the image attached to this message".
The paper's setup is Qwen2.5-VL-3B-Instruct served by vLLM::

    vllm serve Qwen/Qwen2.5-VL-3B-Instruct --port 8000
    prismrec derive movielens-small --backend openai --base-url http://127.0.0.1:8000/v1 \\
        --model Qwen/Qwen2.5-VL-3B-Instruct --concurrency 16

Several ``--base-url`` options fan requests out across servers (see :mod:`prismrec.semantics.openai_http`).

Text-only servers (llama.cpp's ``llama-server`` without ``--mmproj``, vLLM or Ollama serving a text model)
refuse images. ``image_input`` (CLI ``--image-input``) says what to send on the visual and hybrid routes:

* ``auto`` (default): attach images until the server refuses one; the deriver sends one image request first
  and, if the server says images are not supported, stops sending images for the run (one message naming
  this option) and sends the poster analysis text instead, as the ``local-llm`` backend does. The verdict
  is remembered in the cache for this server and model, so a rerun asks nothing again;
* ``attached``: always attach (a refusal fails the item at once, never retried);
* ``analysis``: the poster analysis text (EfficientNet-Lite0 labels and colours) in place of the image;
* ``none``: no image at all; the visual and hybrid routes use the textual prompt (recorded per item as
  the fallback ``image_input_none``).

Failures are classified by :func:`~prismrec.semantics.openai_http.classify_error`: permanent ones (images or
context refused, other 4xx, truncation at temperature 0) are not retried.
"""

from __future__ import annotations

import base64
import functools
import mimetypes
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from prismrec.semantics.backends.base import BACKENDS, Backend, ImageInput, answer_problem
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.openai_http import (
    OpenAIClient,
    OpenAIConnectionOptions,
    PermanentAnswer,
    RequestFailed,
    RetryableAnswer,
)
from prismrec.semantics.types import (
    ChatMessage,
    Generation,
    GenerationFailure,
    GenerationRequest,
    GenerationResult,
    stable_hash,
)


class OpenAIChatOptions(OpenAIConnectionOptions):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("Qwen/Qwen2.5-VL-3B-Instruct", description="model name the server knows")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    max_tokens: int = Field(512, ge=1)
    seed: int | None = Field(0, description="sampling seed where the server honours it")
    image_input: Literal["auto", "attached", "analysis", "none"] = Field(
        "auto", description="images on the visual and hybrid routes: auto (attach until the server refuses, then "
        "the poster analysis text), attached, analysis (the poster analysis text), none (textual prompt)")


def image_data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0] or "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def to_openai_messages(messages: tuple[ChatMessage, ...]) -> list[dict[str, Any]]:
    converted: list[dict[str, Any]] = []
    for message in messages:
        if message.image is None:
            converted.append({"role": message.role, "content": message.text})
        else:
            converted.append({"role": message.role, "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(message.image)}},
                {"type": "text", "text": message.text},
            ]})
    return converted


def _validate_chat(payload: dict[str, Any], *, deterministic: bool = False) -> None:
    """Reject unusable chat completions: retryable, except a truncation when sampling is deterministic
    (temperature 0: the same request with the same ``max_tokens`` is truncated again)."""
    try:
        choice = payload["choices"][0]
        content = choice["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        raise RetryableAnswer("malformed chat completion (no choices[0].message)") from None
    finish_reason = choice.get("finish_reason")
    problem = answer_problem(content if isinstance(content, str) else None, finish_reason)
    if problem is None:
        return
    if deterministic and finish_reason == "length":
        raise PermanentAnswer(f"{problem} at temperature 0: the same request is truncated again", kind="truncated")
    raise RetryableAnswer(problem)


@BACKENDS.register("openai")
class OpenAIBackend(Backend):
    Options: ClassVar[type[BaseModel]] = OpenAIChatOptions
    options: OpenAIChatOptions

    def __init__(self, options: OpenAIChatOptions, cache: SemanticCache) -> None:
        super().__init__(options, cache)
        self.client = OpenAIClient(options)
        # What the deriver sends now; ``auto`` starts by attaching and is settled by the deriver's probe.
        self.image_input: ImageInput = "attached" if options.image_input == "auto" else options.image_input
        self.probe_images = options.image_input == "auto"

    def capability_key(self) -> str:
        """Names this server set and model in the cache's capability notes (no secrets)."""
        return stable_hash({"backend": "openai", "base_urls": sorted(self.options.base_urls),
                            "model": self.options.model})

    @property
    def backend_name(self) -> str:
        return "openai"

    @property
    def model(self) -> str:
        return self.options.model

    @property
    def concurrency(self) -> int:
        return self.client.total_concurrency

    def generation_params(self) -> dict:
        return {"temperature": self.options.temperature, "max_tokens": self.options.max_tokens,
                "seed": self.options.seed}

    def public_config(self) -> dict:
        return {**super().public_config(), "base_urls": self.options.base_urls,
                "api_key_env": self.options.api_key_env, "api_key_set": self.client.api_key_set,
                "concurrency_per_url": self.options.concurrency, "image_input_option": self.options.image_input,
                "image_input": self.image_input}

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return [await self._generate_one(request) for request in requests]

    async def _generate_one(self, request: GenerationRequest) -> GenerationResult:
        body: dict[str, Any] = {
            "model": self.options.model,
            "messages": to_openai_messages(request.messages),
            "temperature": self.options.temperature,
            "max_tokens": self.options.max_tokens,
        }
        if self.options.seed is not None:
            body["seed"] = self.options.seed
        self.calls += 1
        try:
            response = await self.client.post(
                "/chat/completions", body,
                validate=functools.partial(_validate_chat, deterministic=self.options.temperature == 0))
        except RequestFailed as failure:
            return GenerationFailure(failure.reason, failure.attempts, permanent=failure.permanent, kind=failure.kind)
        choice = response.payload["choices"][0]
        usage = response.payload.get("usage") or {}
        return Generation(
            text=choice["message"]["content"].strip(),
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            latency_s=response.latency_s,
            finish_reason=choice.get("finish_reason"),
        )

    async def aclose(self) -> None:
        await self.client.aclose()
