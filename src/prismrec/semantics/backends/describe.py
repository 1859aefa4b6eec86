"""``describe``: the offline default. No generative model and no MLLM: deterministic renderings.

- textual route: the item's attribute pairs as one paragraph. With no model to paraphrase them this is
  exactly the item's original text, so the ``text`` and ``original`` matrices coincide for this backend
  (the text is embedded once).
- visual route: the poster analysed by EfficientNet-Lite0 (top ImageNet labels with probabilities) plus
  colour analysis (dominant colour names, brightness, contrast, saturation), as one sentence.
- hybrid route: both together. There is nothing to refine, so multi-turn refinement is skipped.
- xreflect route (opt-in, ``--with-xreflect``): no MLLM is involved, so no cross-reflection happens either.
  The offline rendering lays the two modalities side by side as the evidence a reflection would weigh:
  ``"Text: <attribute pairs>. Poster analysis: <image analysis>"``. Its embedding therefore carries the same
  information as the hybrid one in a different wording; it exists so that the X-REFLECT baseline's four-way
  pipeline runs end to end offline, not as a stand-in for a real model's answer.

The image analysis is cached per image content hash, so visual and hybrid share one CNN pass per poster,
and the 1280-d pooled features become the artefact's optional ``image`` matrix.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from prismrec.semantics.backends.base import BACKENDS, Backend, ImageInput
from prismrec.semantics.cache import SemanticCache
from prismrec.semantics.image_analysis import ANALYSER_MODEL, RENDER_VERSION, ImageAnalyser, render_analysis
from prismrec.semantics.prompts import XREFLECT
from prismrec.semantics.types import Generation, GenerationFailure, GenerationRequest, GenerationResult


class DescribeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(256, ge=1, description="items per call (the CNN batches equally sized posters by 32)")
    top_labels: int = Field(3, ge=1, le=10, description="ImageNet labels to name per poster")
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="CNN precision; auto = bfloat16 where the CPU supports it natively")


@BACKENDS.register("describe")
class DescribeBackend(Backend):
    Options: ClassVar[type[BaseModel]] = DescribeOptions
    image_input: ImageInput = "analysis"
    options: DescribeOptions

    def __init__(self, options: DescribeOptions, cache: SemanticCache) -> None:
        super().__init__(options, cache)
        self.analyser = ImageAnalyser(cache, top_labels=options.top_labels, precision=options.precision)

    @property
    def backend_name(self) -> str:
        return "describe"

    @property
    def model(self) -> str:
        return ANALYSER_MODEL

    @property
    def batch_size(self) -> int:
        return self.options.batch_size

    @property
    def iterates_internally(self) -> bool:
        return False

    def generation_params(self) -> dict:
        return {"top_labels": self.options.top_labels, "precision": self.analyser.precision,
                "render_version": RENDER_VERSION}

    async def generate_batch(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        return await asyncio.to_thread(self._generate_sync, requests)

    def _generate_sync(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        images = {r.item.image_sha: r.item.image_path for r in requests
                  if r.modality != "text" and r.item.image_sha is not None and r.item.image_path is not None}
        analyses = self.analyser.analyse(images) if images else {}
        results: list[GenerationResult] = []
        for request in requests:
            self.calls += 1
            item = request.item
            if request.modality == "text":
                results.append(Generation(text=item.original_text))
                continue
            if item.image_sha not in analyses:
                results.append(GenerationFailure(f"no image analysis for {item.image_path}"))
                continue
            visual = render_analysis(analyses[item.image_sha][0])
            if request.template_key == XREFLECT.key:
                text = f"Text: {item.original_text.rstrip('. ')}. Poster analysis: {visual}"
            elif request.modality == "image":
                text = visual
            else:
                text = f"{item.original_text.rstrip('. ')}. {visual}"
            results.append(Generation(text=text))
        return results
