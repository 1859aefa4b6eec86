"""Prompt templates as versioned data: the DMESR three-way prompts (paper section 3.2.1) and our refinement turn.

Every template has a name and an integer version; every cached answer records both, so changing a
template's wording means bumping its version (old answers stay in the cache, keyed apart). Further
prompt families (X-REFLECT, MLLM-MSR) are added by registering more templates in ``PROMPTS``.

Placeholders (``str.format`` fields):

- ``{attributes}``: the item's attribute pairs. The paper writes them as
  ``attribute_1 :< content_1 >; ...; attribute_n :< content_n >``; we render each pair as
  ``name: content`` joined by ``"; "`` (see :func:`render_attributes`), which is also the item's
  "original text" that the ``original`` matrix embeds.
- ``{text_info}``: the same attribute rendering, for the hybrid prompt's "text info".
- ``{image_path}``: how the prompt refers to the image. The paper passes a local file path. Backends
  that send the image itself as a message part (``openai``, ``transformers``) attach the image to the
  message and replace the placeholder by a reference to it (:data:`ATTACHED_IMAGE_REFERENCE`); text-only
  backends (``local-llm``) replace it by an automatic analysis of the image (:func:`analysis_reference`);
  the literal path is used only by a backend whose ``image_input`` is ``"path"`` (a server that reads
  local files).

Items without an image: the visual, hybrid and xreflect routes fall back to the textual prompt (text only), and
the fallback is counted and recorded per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from prismrec.registry import Registry


class Route(StrEnum):
    """The prompting routes: DMESR section 3.2.1's three, and the opt-in X-REFLECT cross-reflection route."""

    TEXTUAL = "textual"
    VISUAL = "visual"
    HYBRID = "hybrid"
    XREFLECT = "xreflect"


ROUTES: tuple[Route, ...] = (Route.TEXTUAL, Route.VISUAL, Route.HYBRID)
"""The routes every derivation runs (DMESR's three); ``Route.XREFLECT`` runs only when asked for."""

Modality = Literal["text", "image", "text+image"]
"""What a template asks the model to look at."""

ATTACHED_IMAGE_REFERENCE = "the image attached to this message"


@dataclass(frozen=True)
class PromptTemplate:
    """A named, versioned prompt text with ``str.format`` placeholders."""

    name: str
    version: int
    text: str
    modality: Modality
    description: str = ""

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"

    def render(self, **fields: str) -> str:
        return self.text.format(**fields)


PROMPTS: Registry[PromptTemplate] = Registry("prompt template")


def register_template(template: PromptTemplate) -> PromptTemplate:
    PROMPTS.register(template.name)(template)
    return template


# --- DMESR section 3.2.1, verbatim (only the placeholders are ours) ------------------------------------
DMESR_TEXTUAL = register_template(PromptTemplate(
    name="dmesr-textual",
    version=1,
    modality="text",
    text=(
        "The item has the following attributes: {attributes}. Summarize the item based on the text above and "
        "describe it smoothly in one paragraph for recommendation."
    ),
    description="DMESR textual prompt (section 3.2.1)",
))

DMESR_VISUAL = register_template(PromptTemplate(
    name="dmesr-visual",
    version=1,
    modality="image",
    text=(
        "Image data is given via local path {image_path}. Analyze the provided image carefully, pay close "
        "attention to specific visual elements such as color schemes, main characters, prominent objects, and "
        "artistic style, and explicitly mention them in your description. The description should accurately "
        "reflect the image's theme, mood and atmosphere. Output only a well-structured and vivid paragraph for "
        "recommendation."
    ),
    description="DMESR visual prompt (section 3.2.1)",
))

DMESR_HYBRID = register_template(PromptTemplate(
    name="dmesr-hybrid",
    version=1,
    modality="text+image",
    text=(
        "The item's text info is: {text_info}. The image is given in {image_path}. Carefully analyze the "
        "provided textual description and movie poster through the following iterative steps.\n"
        "Step 1: Initial Generation. Jointly analyze the item's text and image information to identify key "
        "thematic and visual elements relevant to recommendation, such as genre, emotional tone, main characters, "
        "setting, and target audience. Generate an initial paragraph that integrates the original textual content "
        "with complementary visual cues.\n"
        "Step 2: Recursive Refinement. Review the generated paragraph and reanalyze original modalities to detect "
        "missing or inconsistent details. Revise the description by adding omitted but relevant visual or textual "
        "information to improve completeness, coherence, and recommendation focus.\n"
        "Step 3: Final Output. Repeat Step 2 until no new information added, yielding a unified, "
        "recommendation-oriented description."
    ),
    description="DMESR hybrid prompt with recursive prompting, single prompt (section 3.2.1)",
))

# --- our multi-turn recursive refinement (the paper's Steps 1 and 2 as separate turns) -----------------
HYBRID_INITIAL = register_template(PromptTemplate(
    name="prismrec-hybrid-initial",
    version=1,
    modality="text+image",
    text=(
        "The item's text info is: {text_info}. The image is given in {image_path}. Jointly analyze the item's "
        "text and image information to identify key thematic and visual elements relevant to recommendation, such "
        "as genre, emotional tone, main characters, setting, and target audience. Generate an initial paragraph "
        "that integrates the original textual content with complementary visual cues. Output only the paragraph."
    ),
    description="multi_turn hybrid, turn 1: the paper's Step 1 as its own request",
))

HYBRID_REFINE = register_template(PromptTemplate(
    name="prismrec-hybrid-refine",
    version=1,
    modality="text+image",
    text=(
        "Review the paragraph you generated and reanalyze the original text and image to detect missing or "
        "inconsistent details. Revise the description by adding omitted but relevant visual or textual "
        "information to improve completeness, coherence, and recommendation focus. If nothing is missing, "
        "repeat the paragraph unchanged. Output only the revised paragraph."
    ),
    description="multi_turn hybrid, refinement turn: the paper's Step 2, asked again until the text settles",
))

# --- X-REFLECT baseline (Lyu et al., arXiv:2408.15172): cross-reflection between text and image ---------
# Our wording of the paper's idea (its exact prompt is not public): describe, find where the two modalities
# support and where they contradict each other, then write the enhanced description from that reflection.
XREFLECT = register_template(PromptTemplate(
    name="xreflect",
    version=1,
    modality="text+image",
    text=(
        "The item's text info is: {text_info}. The image is given in {image_path}. Cross-reflect on the two "
        "modalities before describing the item.\n"
        "Step 1: Supporting evidence. List where the image supports or complements the text (for example genre, "
        "mood, setting, characters, style or target audience that both convey, or that one adds to the other).\n"
        "Step 2: Contradicting evidence. List where the image and the text contradict each other or suggest "
        "different things, and judge which modality is more reliable for each point.\n"
        "Step 3: Enhanced description. Using the supporting evidence and resolving the contradictions, write one "
        "coherent, recommendation-oriented paragraph describing the item. Output only that paragraph."
    ),
    description="X-REFLECT cross-reflection prompt (support / contradiction, then an enhanced description)",
))


def render_attributes(attributes: dict[str, str]) -> str:
    """``{"title": "Toy Story", "year": "1995"}`` -> ``"title: Toy Story; year: 1995"``."""
    return "; ".join(f"{name}: {value}" for name, value in attributes.items())


def analysis_reference(analysis: str) -> str:
    """How a text-only backend refers to an image it cannot see: by an automatic analysis of it."""
    return f"the poster image, which an image classifier describes as follows: {analysis}"


def path_reference(path: Path) -> str:
    return str(path)
