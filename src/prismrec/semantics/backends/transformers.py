"""``transformers``: Qwen2.5-VL (the paper's MLLM) or any image-text-to-text model from a local folder.

The image goes into the user message as an image part (the chat template inserts the model's image
tokens) and the prompt's ``{image_path}`` placeholder reads "the image attached to this message".
Requests are generated in batches (left padding) on CPU or CUDA.

Inputs are built with ``AutoProcessor`` where it loads. The stock Qwen2.5-VL processor needs torchvision
(for its fast image processor); where torchvision does not import, the inputs are built from the
tokenizer's chat template and the PIL image processor directly, expanding each image placeholder to
``grid_t * grid_h * grid_w / merge_size**2`` image tokens exactly as the processor would
(:func:`prismrec.llmrec.causal_lm.image_text_inputs`, shared with MLLM-MSR's multimodal recommender).

Example (weights downloaded beforehand, e.g. ``huggingface-cli download Qwen/Qwen2.5-VL-3B-Instruct``)::

    prismrec derive movielens-small --backend transformers --model ~/models/Qwen2.5-VL-3B-Instruct \\
        --device cuda --batch-size 16
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from prismrec.llmrec.causal_lm import image_text_inputs, load_image_processor, open_rgb_image
from prismrec.semantics.backends.base import BACKENDS, Backend, ImageInput
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.types import ChatMessage, Generation, GenerationRequest, GenerationResult


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="local folder of an image-text-to-text model (e.g. Qwen2.5-VL-3B-Instruct)")
    device: str = Field("auto", description="auto (cuda if available), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")
    batch_size: int = Field(4, ge=1)
    max_tokens: int = Field(512, ge=1, description="max new tokens per answer")
    min_tokens: int = Field(0, ge=0, description="min new tokens per answer")
    temperature: float = Field(0.0, ge=0.0, description="0: greedy decoding")
    seed: int = 0
    max_pixels: int = Field(28 * 28 * 1280, ge=56 * 56, description="image size cap (pixels) for the vision tower")


def to_hf_messages(messages: tuple[ChatMessage, ...]) -> tuple[list[dict[str, Any]], list[Path]]:
    """Chat-template messages (image parts first) and the images they reference, in order."""
    converted: list[dict[str, Any]] = []
    images: list[Path] = []
    for message in messages:
        parts: list[dict[str, Any]] = []
        if message.image is not None:
            parts.append({"type": "image"})
            images.append(message.image)
        parts.append({"type": "text", "text": message.text})
        converted.append({"role": message.role, "content": parts})
    return converted, images


@BACKENDS.register("transformers")
class TransformersBackend(Backend):
    Options: ClassVar[type[BaseModel]] = TransformersOptions
    image_input: ImageInput = "attached"
    options: TransformersOptions

    def __init__(self, options: TransformersOptions, cache: SemanticCache) -> None:
        super().__init__(options, cache)
        self.path = Path(options.model).expanduser()
        if not (self.path / "config.json").exists():
            raise FileNotFoundError(f"{self.path}: not a model folder (no config.json); the transformers backend "
                                    "loads local folders only")
        if options.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        else:
            self.device = options.device
        if options.dtype == "auto":
            self.dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        else:
            self.dtype = getattr(torch, options.dtype)
        self._loaded: tuple[Any, Any, Any, Any] | None = None
        self.uses_auto_processor = False

    @property
    def backend_name(self) -> str:
        return "transformers"

    @property
    def model(self) -> str:
        return str(self.path.resolve())

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    def generation_params(self) -> dict:
        return {"max_tokens": self.options.max_tokens, "min_tokens": self.options.min_tokens,
                "temperature": self.options.temperature, "seed": self.options.seed,
                "max_pixels": self.options.max_pixels, "dtype": str(self.dtype).removeprefix("torch.")}

    def _load(self) -> tuple[Any, Any, Any, Any]:
        """(model, tokenizer, image processor, processor or None)."""
        if self._loaded is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()

            size = {"shortest_edge": 56 * 56, "longest_edge": self.options.max_pixels}
            processor = None
            try:
                processor = AutoProcessor.from_pretrained(self.path, size=size)
                tokenizer, image_processor = processor.tokenizer, processor.image_processor
                self.uses_auto_processor = True
            except Exception:
                processor = None
                tokenizer = AutoTokenizer.from_pretrained(self.path)
                image_processor = load_image_processor(self.path, self.options.max_pixels)
            tokenizer.padding_side = "left"
            model = AutoModelForImageTextToText.from_pretrained(self.path, dtype=self.dtype).to(self.device).eval()
            self._loaded = (model, tokenizer, image_processor, processor)
        return self._loaded

    def build_inputs(self, requests: list[GenerationRequest]) -> dict[str, torch.Tensor]:
        model, tokenizer, image_processor, processor = self._load()
        conversations = [to_hf_messages(r.messages) for r in requests]
        texts = [tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                 for messages, _ in conversations]
        images = [open_rgb_image(path) for _, paths in conversations for path in paths]
        if processor is not None:
            return dict(processor(text=texts, images=images or None, padding=True, return_tensors="pt"))
        return image_text_inputs(tokenizer, image_processor, model.config.image_token_id, texts, images)

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return await asyncio.to_thread(self._generate_sync, requests)

    def _generate_sync(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        model, tokenizer, _, _ = self._load()
        inputs = {k: v.to(self.device) for k, v in self.build_inputs(requests).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return generate_answers(model, tokenizer, inputs, requests=len(requests), max_tokens=self.options.max_tokens,
                                min_tokens=self.options.min_tokens, temperature=self.options.temperature,
                                seed=self.options.seed, on_calls=self._count)

    def _count(self, n: int) -> None:
        self.calls += n


def generate_answers(model: Any, tokenizer: Any, inputs: dict[str, torch.Tensor], *, requests: int, max_tokens: int,
                     min_tokens: int, temperature: float, seed: int,
                     on_calls: Callable[[int], None] | None = None) -> list[GenerationResult]:
    """Batched ``generate`` on left-padded inputs; answers end at the first end-of-sequence token.

    An answer that reaches ``max_tokens`` without one has ``finish_reason = "length"`` (truncated).
    """
    sample = temperature > 0
    if sample:
        torch.manual_seed(seed)
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}
    eos_ids.discard(None)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=max_tokens, min_new_tokens=min_tokens, do_sample=sample,
            temperature=temperature if sample else None, top_p=None, top_k=None,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids),
        )
    latency = (time.perf_counter() - started) / requests
    if on_calls is not None:
        on_calls(requests)
    prompt_length = inputs["input_ids"].shape[1]
    results: list[GenerationResult] = []
    for row in range(requests):
        new = output[row, prompt_length:].tolist()
        stop = next((i for i, token in enumerate(new) if token in eos_ids), None)
        kept = new if stop is None else new[:stop]
        results.append(Generation(
            text=tokenizer.decode(kept, skip_special_tokens=True).strip(),
            prompt_tokens=int(inputs["attention_mask"][row].sum()),
            completion_tokens=len(kept),
            latency_s=latency,
            finish_reason="stop" if stop is not None else "length",
        ))
    return results
