"""MLLM-MSR prompt texts: the versioned prompt templates of steps 2 and 3 (registered once, here; their names and
versions key the cached answers), step 1's item texts (:class:`ItemTexts`: attributes plus the MLLM's image
summary) and the recommender prompt of step 3 (:class:`RecommenderPrompt`)."""

from __future__ import annotations

from dataclasses import dataclass

from prismrec.data.dataset import SequenceDataset
from prismrec.llmrec.mllm_msr.config import ItemTextOptions
from prismrec.semantics.prompts import PromptTemplate, register_template

SUMMARY_PREFIX = "The user appears to have a preference for"
EMPTY_HISTORY_SUMMARY = "The user has no recorded interactions yet."

# --- prompts (versioned: changing a wording means bumping its version; cached answers stay keyed apart) --
USER_SUMMARY_FIRST = register_template(PromptTemplate(
    name="mllm-msr-user-first",
    version=1,
    modality="text",
    text=(
        "A user interacted with the following items, in this order:\n{items}\n"
        "Summarise the user's preferences in two or three sentences. Start your answer with "
        f"\"{SUMMARY_PREFIX}\"."
    ),
    description="MLLM-MSR recurrent user summary, first block (paper Figure 2)",
))

USER_SUMMARY_UPDATE = register_template(PromptTemplate(
    name="mllm-msr-user-update",
    version=1,
    modality="text",
    text=(
        "Summary of a user's preferences so far: {summary}\n"
        "The user then interacted with the following items, in this order:\n{items}\n"
        "Update the summary of the user's preferences with these items in two or three sentences. Start your "
        f"answer with \"{SUMMARY_PREFIX}\"."
    ),
    description="MLLM-MSR recurrent user summary, every next block: previous summary + new items",
))

RECOMMEND = register_template(PromptTemplate(
    name="mllm-msr-recommend",
    version=1,
    modality="text",
    text=(
        "{summary}\nRecently the user interacted with these items, in this order: {recent}.\n"
        "Candidate item: {candidate}\n"
        "Will the user interact with the candidate item? Answer yes or no."
    ),
    description="MLLM-MSR recommender prompt (paper Figure 3); the answer is 'yes' or 'no'",
))

# {image} marks where the candidate's image goes (an image part of the chat message).
RECOMMEND_WITH_IMAGE = register_template(PromptTemplate(
    name="mllm-msr-recommend-image",
    version=1,
    modality="text+image",
    text=(
        "{summary}\nRecently the user interacted with these items, in this order: {recent}.\n"
        "Candidate item: {image}\n{candidate}\n"
        "Will the user interact with the candidate item? Answer yes or no."
    ),
    description="MLLM-MSR recommender prompt with the candidate's image (multimodal LLMs); answer 'yes' or 'no'",
))
IMAGE_MARKER = "\x00candidate-image\x00"


# --- step 1: item texts ---------------------------------------------------------------------------------
class ItemTexts:
    """Each item as prompt text: ``title: ...; year: ...; genres: ...; image: <image summary>``."""

    def __init__(self, dataset: SequenceDataset, options: ItemTextOptions) -> None:
        self.dataset = dataset
        self.options = options
        self._summaries: dict[int, str] = {}
        if options.semantics is not None:
            from prismrec.semantics.artefact import load_artefact

            artefact = load_artefact(options.semantics)
            artefact.check_matches(dataset.item_ids)
            table = artefact.descriptions()
            for item_id, text in zip(table["item_id"], table[options.route], strict=True):
                if isinstance(text, str) and text.strip():
                    self._summaries[int(item_id)] = _cap_words(text.strip(), options.max_summary_words)
        self._texts: dict[int, str] = {}

    def title(self, item_id: int) -> str:
        attributes = self.dataset.item_attributes(item_id)
        return attributes.get("title") or next(iter(attributes.values()), f"item {item_id}")

    def text(self, item_id: int) -> str:
        if item_id not in self._texts:
            attributes = self.dataset.item_attributes(item_id)
            parts = [f"{name}: {attributes[name]}" for name in self.options.attributes if name in attributes]
            if not parts:
                parts = [f"title: {self.title(item_id)}"]
            summary = self._summaries.get(item_id)
            if summary and self.options.max_summary_words > 0:
                parts.append(f"image: {summary}")
            self._texts[item_id] = "; ".join(parts)
        return self._texts[item_id]


def _cap_words(text: str, words: int) -> str:
    pieces = text.split()
    return text if len(pieces) <= words else " ".join(pieces[:words]) + " ..."


# --- step 3's input: the recommender prompt -------------------------------------------------------------
@dataclass(frozen=True)
class RecommenderPrompt:
    """A recommender prompt through the chat template, with the candidate's image where one is attached.

    ``text`` holds one image placeholder when ``image_item`` is set (the item whose image it takes);
    ``text_only`` is the same prompt without the image, used if that image cannot be read at encoding time.
    """

    text: str
    image_item: int | None = None
    text_only: str | None = None


def prompt_text(prompt: RecommenderPrompt | str) -> str:
    return prompt if isinstance(prompt, str) else prompt.text
