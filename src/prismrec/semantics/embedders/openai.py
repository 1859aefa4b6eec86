"""``openai``: the embeddings endpoint of an OpenAI-compatible server (the paper: text-embedding-ada-002).

Batched (``batch_size`` texts per request, requests in flight up to the concurrency), with the same retry,
backoff and fan-out policy as the chat backend.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from prismrec.semantics.embedders.base import EMBEDDERS, Embedder
from prismrec.semantics.openai_http import OpenAIClient, OpenAIConnectionOptions, RequestFailed, RetryableAnswer


class OpenAIEmbeddingOptions(OpenAIConnectionOptions):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("text-embedding-ada-002")
    batch_size: int = Field(64, ge=1, le=2048, description="texts per request")


class EmbeddingFailed(RuntimeError):
    pass


@EMBEDDERS.register("openai")
class OpenAIEmbedder(Embedder):
    Options: ClassVar[type[BaseModel]] = OpenAIEmbeddingOptions
    options: OpenAIEmbeddingOptions

    def __init__(self, options: OpenAIEmbeddingOptions) -> None:
        super().__init__(options)
        self.client = OpenAIClient(options)

    @property
    def embedder_name(self) -> str:
        return "openai"

    @property
    def model(self) -> str:
        return self.options.model

    @property
    def chunk_size(self) -> int:
        return self.options.batch_size * self.client.total_concurrency

    def public_config(self) -> dict:
        return {**super().public_config(), "base_urls": self.options.base_urls,
                "api_key_env": self.options.api_key_env, "api_key_set": self.client.api_key_set}

    async def embed(self, texts: list[str]) -> np.ndarray:
        size = self.options.batch_size
        batches = [texts[i:i + size] for i in range(0, len(texts), size)]
        limit = asyncio.Semaphore(self.client.total_concurrency)

        async def one(batch: list[str]) -> np.ndarray:
            async with limit:
                return await self._embed_batch(batch)

        parts = await asyncio.gather(*(one(b) for b in batches))
        return np.concatenate(parts, axis=0) if parts else np.zeros((0, 0), dtype=np.float32)

    async def _embed_batch(self, texts: list[str]) -> np.ndarray:
        def validate(payload: dict[str, Any]) -> None:
            data = payload.get("data")
            if not isinstance(data, list) or len(data) != len(texts):
                raise RetryableAnswer(f"embeddings answer has {len(data) if isinstance(data, list) else 'no'} "
                                      f"vectors for {len(texts)} texts")
            dims = {len(d.get("embedding") or []) for d in data if isinstance(d, dict)}
            if len(dims) != 1 or 0 in dims:
                raise RetryableAnswer("embeddings answer has empty or ragged vectors")

        self.calls += 1
        try:
            response = await self.client.post("/embeddings", {"model": self.options.model, "input": texts},
                                              validate=validate)
        except RequestFailed as failure:
            raise EmbeddingFailed(f"embedding {len(texts)} texts failed after {failure.attempts} attempts: "
                                  f"{failure.reason}") from None
        data = sorted(response.payload["data"], key=lambda d: d.get("index", 0))
        return np.asarray([d["embedding"] for d in data], dtype=np.float32)

    async def aclose(self) -> None:
        await self.client.aclose()
