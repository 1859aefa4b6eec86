"""MLLM-MSR step 3, the recommender (paper Figure 3): :class:`MLLMMSR`, a LoRA-tuned LLM that answers yes/no for
(user summary, recent items, candidate), its LoRA training loop (cross-entropy on the answer token) and its
p(yes) / (p(yes) + p(no)) scoring; :class:`CandidateImages` holds the candidate images a multimodal LLM sees."""

from __future__ import annotations

import random
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from prismrec.data.dataset import SequenceDataset
from prismrec.llmrec.causal_lm import (
    add_lora,
    answer_token_ids,
    chat_prompt,
    image_text_inputs,
    image_token_count,
    is_image_text_to_text_model,
    last_token_logits,
    load_causal_lm,
    load_image_processor,
    load_lora_adapter,
    open_rgb_image,
    resolve_model_source,
    save_lora_adapter,
    yes_probability,
)
from prismrec.llmrec.mllm_msr.config import MLLMMSROptions, MLLMMSRTrainingOptions
from prismrec.llmrec.mllm_msr.prompts import (
    IMAGE_MARKER,
    RECOMMEND,
    RECOMMEND_WITH_IMAGE,
    ItemTexts,
    RecommenderPrompt,
    prompt_text,
)


@dataclass(frozen=True)
class PromptSample:
    """One recommender prompt and, for training, its answer."""

    prompt: RecommenderPrompt | str
    label: bool | None = None


PREFIX_END = "Candidate item:"  # the recommender templates write the candidate after it (prompts.py)


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Tokens that every sequence starts with, leaving each sequence at least one token of its own."""
    first, shortest = sequences[0], min(len(s) for s in sequences)
    length = 0
    while length < shortest - 1 and all(s[length] == first[length] for s in sequences):
        length += 1
    return length


class CandidateImages:
    """Candidate images for a multimodal recommender: opened, shrunk to ``max_side`` and kept in an LRU.

    An item without an image, or whose file cannot be read, has none: ``missing`` records why (one warning
    per unreadable file, naming the item and the file), and its prompts fall back to text.
    """

    def __init__(self, dataset: SequenceDataset, max_side: int, capacity: int = 512) -> None:
        self.dataset = dataset
        self.max_side = max_side
        self.capacity = capacity
        self.missing: dict[int, str] = {}
        self._images: OrderedDict[int, Any] = OrderedDict()

    def get(self, item: int) -> Any | None:
        """The item's image (PIL, RGB, shrunk), or None (no image, or unreadable: recorded in ``missing``)."""
        if item in self._images:
            self._images.move_to_end(item)
            return self._images[item]
        if item in self.missing:
            return None
        path = self.dataset.image_path(item)
        if path is None:
            self.missing[item] = "no image"
            return None
        try:
            image = open_rgb_image(path, self.max_side)
        except (OSError, ValueError, Image.DecompressionBombError) as error:  # missing, truncated, not an image
            self.missing[item] = f"unreadable {path}: {error}"
            warnings.warn(f"item {self.dataset.item_ids[item]} (id {item}): cannot read its image {path} "
                          f"({error}); its prompts use the text only", stacklevel=2)
            return None
        self._images[item] = image
        if len(self._images) > self.capacity:
            self._images.popitem(last=False)
        return image

    def report(self) -> dict[str, Any]:
        """What final.json records: items without an image (external id -> reason)."""
        return {"items_without_image": len(self.missing),
                "missing": {str(self.dataset.item_ids[i]): reason for i, reason in sorted(self.missing.items())}}


class MLLMMSR:
    """The LoRA-tuned LLM that answers yes/no for (user summary, recent items, candidate).

    With a multimodal LLM (Qwen2.5-VL) and ``options.candidate_image``, prompts carry the candidate's image;
    ``image_processor`` is then required (:meth:`create` loads it from the model folder).
    """

    def __init__(self, options: MLLMMSROptions, model: Any, tokenizer: Any, items: ItemTexts,
                 image_processor: Any | None = None) -> None:
        self.options = options
        self.model = model
        self.tokenizer = tokenizer
        self.items = items
        self.yes_id, self.no_id = answer_token_ids(tokenizer)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.uses_images = options.candidate_image and is_image_text_to_text_model(model)
        self.image_processor = image_processor
        self.images: CandidateImages | None = None
        if self.uses_images:
            if image_processor is None:
                raise ValueError("a multimodal LLM with candidate_image = true needs its image processor "
                                 "(MLLMMSR.create loads it); or set candidate_image = false")
            self.images = CandidateImages(items.dataset, options.image_max_side)
            self.image_token_id = int(model.config.image_token_id)
        self.prompts_with_image = 0
        self.prompts_text_only = 0

    @classmethod
    def create(cls, options: MLLMMSROptions, items: ItemTexts, seed: int = 42,
               adapter: Path | None = None) -> MLLMMSR:
        """Load the base LLM and add fresh LoRA adapters (seeded), or the adapter saved in ``adapter``."""
        model, tokenizer = load_causal_lm(options.llm)
        image_processor = None
        if options.candidate_image and is_image_text_to_text_model(model):
            image_processor = load_image_processor(resolve_model_source(options.llm.model),
                                                   options.image_max_side ** 2)
        if adapter is not None:
            return cls(options, load_lora_adapter(model, adapter), tokenizer, items, image_processor)
        torch.manual_seed(seed)
        return cls(options, add_lora(model, options.lora), tokenizer, items, image_processor)

    def prompt(self, summary: str, window: Sequence[int], candidate: int) -> RecommenderPrompt:
        recent = [self.items.title(int(i)) for i in window[len(window) - self.options.recent_items:]] \
            if self.options.recent_items else []
        fields = {"summary": summary, "recent": "; ".join(recent) if recent else "none",
                  "candidate": self.items.text(int(candidate))}
        text_only = chat_prompt(self.tokenizer, RECOMMEND.render(**fields))
        if self.images is None or self.images.get(int(candidate)) is None:
            self.prompts_text_only += 1
            return RecommenderPrompt(text_only)
        self.prompts_with_image += 1
        text = chat_prompt(self.tokenizer, RECOMMEND_WITH_IMAGE.render(image=IMAGE_MARKER, **fields),
                           image_marker=IMAGE_MARKER)
        return RecommenderPrompt(text, int(candidate), text_only)

    def _encode(self, prompts: Sequence[RecommenderPrompt | str]) -> dict[str, torch.Tensor]:
        """``input_ids`` and ``attention_mask`` (left-padded), plus the image inputs where prompts have images."""
        texts: list[str] = []
        images: list[Any] = []
        for prompt in prompts:
            if isinstance(prompt, str) or prompt.image_item is None:
                texts.append(prompt_text(prompt))
                continue
            image = self.images.get(prompt.image_item) if self.images is not None else None
            if image is not None:
                texts.append(prompt.text)
                images.append(image)
            elif prompt.text_only is not None:  # the image became unreadable (warned): fall back to text
                texts.append(prompt.text_only)
            else:
                raise ValueError(f"item {prompt.image_item}: its image cannot be attached and the prompt has no "
                                 "text-only version")
        if images:
            inputs = image_text_inputs(self.tokenizer, self.image_processor, self.image_token_id, texts, images,
                                       add_special_tokens=False)
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        else:
            inputs = dict(self.tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=False))
        return {name: value.to(self.device) for name, value in inputs.items()}

    def _logits(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        return last_token_logits(self.model, inputs["input_ids"], inputs["attention_mask"], **extra)

    def prompt_tokens(self, prompts: Sequence[RecommenderPrompt | str]) -> list[int]:
        """Tokens per prompt as the model sees it (an attached image counts its image tokens)."""
        counts = [len(ids) for ids in self.tokenizer([prompt_text(p) for p in prompts],
                                                     add_special_tokens=False)["input_ids"]]
        for row, prompt in enumerate(prompts):
            if isinstance(prompt, RecommenderPrompt) and prompt.image_item is not None and self.images is not None:
                image = self.images.get(prompt.image_item)
                if image is not None:
                    counts[row] += image_token_count(self.image_processor, image) - 1
        return counts

    # --- shared prompt prefixes (one user's candidates): run once, reuse the KV cache -----------------
    def reuses_prefix(self, prompts: Sequence[RecommenderPrompt | str], wanted: bool | None = None) -> bool:
        """Whether these prompts take the shared-prefix path: ``wanted`` (default the option) and text-only
        prompts on a text-only LLM (a multimodal LLM computes its own 3-D positions)."""
        wanted = self.options.reuse_prompt_prefix if wanted is None else wanted
        return (wanted and not is_image_text_to_text_model(self.model)
                and all(isinstance(p, str) or p.image_item is None for p in prompts))

    @staticmethod
    def prefix_groups(prompts: Sequence[RecommenderPrompt | str]) -> list[list[int]]:
        """Prompt indices grouped by the text before the candidate (in first-seen order).

        Only the grouping uses the text; the shared part itself is found on the token ids, so a group whose
        prompts share less than expected is still scored exactly.
        """
        groups: dict[str, list[int]] = {}
        for index, prompt in enumerate(prompts):
            groups.setdefault(prompt_text(prompt).split(PREFIX_END, 1)[0], []).append(index)
        return list(groups.values())

    def _prefix_cache(self, prefix: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (keys, values) of ``prefix`` (batch 1); with gradients when called in training."""
        ids = torch.tensor([list(prefix)], device=self.device)
        output = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        cache = output.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    def _suffix_logits(self, cache: list[tuple[torch.Tensor, torch.Tensor]], prefix_length: int,
                       suffixes: Sequence[Sequence[int]]) -> torch.Tensor:
        """(B, vocab) next-token logits of prefix + each suffix, the suffixes left-padded in one batch.

        The attention mask covers the prefix, then each suffix's padding (masked) and tokens; positions
        continue from the prefix, so every row sees exactly the tokens (and positions) of its whole prompt.
        """
        from transformers import DynamicCache

        rows, width = len(suffixes), max(len(s) for s in suffixes)
        pad = int(self.tokenizer.pad_token_id)
        ids = torch.tensor([[pad] * (width - len(s)) + list(s) for s in suffixes], device=self.device)
        own = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in suffixes], device=self.device)
        mask = torch.cat([torch.ones(rows, prefix_length, dtype=own.dtype, device=self.device), own], dim=1)
        positions = prefix_length + (own.cumsum(-1) - 1).clamp(min=0)
        past = DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in cache])
        output = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=past,
                            logits_to_keep=1)
        return output.logits[:, -1, :]

    def _group_logits(self, texts: Sequence[str], max_rows: int) -> Iterator[tuple[list[int], torch.Tensor]]:
        """(rows, logits) chunks for prompts sharing a prefix: the prefix once, the rest ``max_rows`` at a time."""
        ids = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        shared = common_prefix_length(ids) if len(ids) > 1 else 0
        order = sorted(range(len(ids)), key=lambda r: len(ids[r]))
        if shared == 0:
            for start in range(0, len(order), max_rows):
                rows = order[start:start + max_rows]
                yield rows, self._logits(self._encode([texts[r] for r in rows]))
            return
        cache = self._prefix_cache(ids[0][:shared])
        for start in range(0, len(order), max_rows):
            rows = order[start:start + max_rows]
            yield rows, self._suffix_logits(cache, shared, [ids[r][shared:] for r in rows])

    @torch.inference_mode()
    def score_prompts(self, prompts: Sequence[RecommenderPrompt | str], batch_size: int = 16,
                      on_batch: Callable[[int], None] | None = None,
                      reuse_prefix: bool | None = None) -> torch.Tensor:
        """p(yes) / (p(yes) + p(no)) per prompt (float32, CPU), ``batch_size`` prompts per forward pass.

        With ``reuse_prefix`` (default: ``options.reuse_prompt_prefix``; text-only prompts on a text-only
        LLM), prompts that share the text before the candidate (one user's candidates) run that part once
        and reuse its KV cache: the same scores (within float rounding) for fewer tokens.
        """
        self.model.eval()
        if self.reuses_prefix(prompts, reuse_prefix):
            out = torch.empty(len(prompts))
            for group in self.prefix_groups(prompts):
                for rows, logits in self._group_logits([prompt_text(prompts[i]) for i in group], batch_size):
                    out[torch.tensor([group[r] for r in rows])] = yes_probability(logits, self.yes_id,
                                                                                  self.no_id).float().cpu()
                    if on_batch is not None:
                        on_batch(len(rows))
            return out
        scores: list[torch.Tensor] = []
        # Similar lengths together: less padding per batch (the order is restored below).
        order = sorted(range(len(prompts)), key=lambda i: len(prompt_text(prompts[i])))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            logits = self._logits(self._encode([prompts[i] for i in rows]))
            scores.append(yes_probability(logits, self.yes_id, self.no_id).float().cpu())
            if on_batch is not None:
                on_batch(len(rows))
        flat = torch.cat(scores) if scores else torch.zeros(0)
        out = torch.empty_like(flat)
        out[torch.tensor(order, dtype=torch.long)] = flat
        return out

    def fit(self, samples: list[PromptSample], options: MLLMMSRTrainingOptions, seed: int = 42,
            on_batch: Callable[[int, float], None] | None = None) -> dict[str, float]:
        """LoRA fine-tuning, cross-entropy on the answer token only ("yes" or "no" after the prompt).

        With the shared-prefix path (:meth:`reuses_prefix`), a batch is made of whole groups of prompts that
        share their text before the candidate (a user's positive and its negatives), packed up to
        ``batch_size`` prompts, and each group's prefix runs once (gradients flow through its KV cache);
        otherwise batches are ``batch_size`` shuffled prompts.
        """
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=options.lr, weight_decay=options.weight_decay)
        rng = random.Random(seed)
        prompts = [s.prompt for s in samples]
        grouped = self.reuses_prefix(prompts)
        size = options.batch_size
        groups = ([g[k:k + size] for g in self.prefix_groups(prompts) for k in range(0, len(g), size)]
                  if grouped else [[i] for i in range(len(samples))])
        self.model.train()
        seen, loss_sum, started = 0, 0.0, time.perf_counter()
        for _epoch in range(options.epochs):
            order = list(groups)
            rng.shuffle(order)
            for batch_groups in _pack(order, size):
                batch = [samples[i] for group in batch_groups for i in group]
                # The answer token is the one right after the prompt: its logits are the prompt's last
                # position, so only that position is projected onto the vocabulary (prompt tokens masked).
                if grouped:
                    parts, labels = [], []
                    for group in batch_groups:
                        for rows, part in self._group_logits([prompt_text(samples[i].prompt) for i in group],
                                                             len(group)):
                            parts.append(part)
                            labels += [bool(samples[group[r]].label) for r in rows]
                    logits = torch.cat(parts)
                else:
                    labels = [bool(s.label) for s in batch]
                    logits = self._logits(self._encode([s.prompt for s in batch]))
                target = torch.tensor([self.yes_id if label else self.no_id for label in labels], device=self.device)
                loss = torch.nn.functional.cross_entropy(logits.float(), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if options.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable, options.grad_clip)
                optimizer.step()
                seen += len(batch)
                loss_sum += float(loss.detach()) * len(batch)
                if on_batch is not None:
                    on_batch(len(batch), float(loss.detach()))
        self.model.eval()
        seconds = time.perf_counter() - started
        return {"train_samples": float(seen), "train_seconds": seconds,
                "train_samples_per_s": seen / seconds if seconds > 0 else float("nan"),
                "train_loss": loss_sum / seen if seen else float("nan")}

    def save_adapter(self, folder: Path) -> None:
        save_lora_adapter(self.model, folder, self.options.lora)

    def image_report(self) -> dict[str, Any]:
        """Whether candidate images were attached, how many prompts had one, and the items without one."""
        report: dict[str, Any] = {"enabled": self.uses_images, "prompts_with_image": self.prompts_with_image,
                                  "prompts_text_only": self.prompts_text_only}
        if self.images is not None:
            report.update(self.images.report())
        return report


def _pack(groups: Sequence[list[int]], size: int) -> list[list[list[int]]]:
    """Consecutive groups packed into batches of at most ``size`` prompts (a bigger group is a batch alone)."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    count = 0
    for group in groups:
        if current and count + len(group) > size:
            batches.append(current)
            current, count = [], 0
        current.append(group)
        count += len(group)
    if current:
        batches.append(current)
    return batches
