"""Text embedders: texts -> float32 vectors (cached by the engine per (embedder, model, text hash))."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
from pydantic import BaseModel

from prismrec.registry import Registry


class Embedder(ABC):
    Options: ClassVar[type[BaseModel]]

    def __init__(self, options: BaseModel) -> None:
        self.options = options
        self.calls = 0  # embedding requests / encode calls made (cache hits are not calls)

    @property
    @abstractmethod
    def embedder_name(self) -> str: ...

    @property
    @abstractmethod
    def model(self) -> str:
        """Identity used in cache keys: everything that changes the vectors."""

    @property
    def chunk_size(self) -> int:
        """Texts per :meth:`embed` call; each call's vectors are committed to the cache together."""
        return 512

    def public_config(self) -> dict:
        return {"embedder": self.embedder_name, "model": self.model}

    @abstractmethod
    async def embed(self, texts: list[str]) -> np.ndarray:
        """``len(texts) x dim`` float32, not normalised."""

    async def aclose(self) -> None:  # noqa: B027  (optional hook)
        """Release connections and models."""


EMBEDDERS: Registry[type[Embedder]] = Registry("text embedder")
