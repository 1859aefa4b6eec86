"""Speeder's prompts: token ids with soft-token item slots (:class:`PromptBuilder`, :class:`PromptBatch`).

Implements SPAE's relative position cues (``"most recent:"`` / ``"k interactions ago:"``, :meth:`PromptBuilder.cue`)
and records each history slot's end-aligned absolute position, which :class:`~prismrec.llmrec.speeder.model.Speeder`
turns into SPAE's absolute position embeddings. The candidate list (letters A..) is the choice task's prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prismrec.llmrec.speeder.config import SpeederError, SpeederOptions

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class PromptBatch:
    """Right-padded prompts: text token ids with item slots, and where to read the answers."""

    input_ids: torch.Tensor  # (B, T) token ids; slot positions hold the pad id (replaced by soft tokens)
    attention_mask: torch.Tensor  # (B, T)
    slot_item: torch.Tensor  # (B, T) item id at a soft-token slot, 0 elsewhere
    slot_sub: torch.Tensor  # (B, T) which of the item's n_tokens the slot holds
    slot_position: torch.Tensor  # (B, T) absolute position index of a history slot, -1 elsewhere
    retrieval_index: torch.Tensor  # (B,) position whose hidden state scores candidates
    choice_index: torch.Tensor | None  # (B,) position whose next-token logits name a candidate
    choice_target: torch.Tensor | None  # (B,) index (0..n_choices-1) of the positive in the listed candidates

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


class PromptBuilder:
    """Builds token-id prompts with soft-token slots; text pieces are tokenised once and cached."""

    HEADER = "A user interacted with these items, oldest first:\n"
    RETRIEVAL = "The next item is:"
    CANDIDATES = "\nCandidates:\n"
    ANSWER = "Answer: ("

    def __init__(self, tokenizer: Any, options: SpeederOptions) -> None:
        self.tokenizer = tokenizer
        self.options = options
        self._cache: dict[str, list[int]] = {}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        self.letter_ids = [self._letter_id(letter) for letter in LETTERS[:options.n_choices]]
        if len(set(self.letter_ids)) != len(self.letter_ids):
            raise SpeederError("the tokenizer maps two candidate letters to the same token")

    def tokens(self, text: str) -> list[int]:
        if text not in self._cache:
            self._cache[text] = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return self._cache[text]

    def _letter_id(self, letter: str) -> int:
        ids = self.tokens(letter)
        if len(ids) != 1:
            raise SpeederError(f"the tokenizer splits the candidate letter {letter!r} into {len(ids)} tokens; "
                               "Speeder's answers must be single tokens")
        return ids[0]

    def cue(self, recency: int) -> str:
        # No trailing space: a lone space is a token of its own in byte-level BPEs (prompt length is the cost).
        if not self.options.relative_position_cues:
            return "item:"
        if recency == 0:
            return "most recent:"
        return f"{recency} interaction{'s' if recency > 1 else ''} ago:"

    def build(self, histories: Sequence[np.ndarray], choices: Sequence[np.ndarray] | None = None,
              choice_targets: Sequence[int] | None = None) -> PromptBatch:
        n_tok, max_len = self.options.n_item_tokens, self.options.max_len
        rows: list[tuple[list[int], list[int], list[int], list[int], int, int]] = []
        for row, history in enumerate(histories):
            history = np.asarray(history, dtype=np.int64)
            history = history[history > 0][-max_len:]
            ids, items, subs, positions = [], [], [], []

            def text(piece: str, ids: list[int] = ids, items: list[int] = items, subs: list[int] = subs,
                     positions: list[int] = positions) -> None:
                tokens = self.tokens(piece)
                ids.extend(tokens)
                items.extend([0] * len(tokens))
                subs.extend([0] * len(tokens))
                positions.extend([-1] * len(tokens))

            def item(item_id: int, position: int, ids: list[int] = ids, items: list[int] = items,
                     subs: list[int] = subs, positions: list[int] = positions) -> None:
                ids.extend([self.pad_id] * n_tok)
                items.extend([int(item_id)] * n_tok)
                subs.extend(range(n_tok))
                positions.extend([position] * n_tok)

            text(self.HEADER)
            for offset, item_id in enumerate(history):
                recency = len(history) - 1 - offset
                text(self.cue(recency))
                item(int(item_id), max_len - 1 - recency)  # end-aligned absolute position
                text("\n")
            text(self.RETRIEVAL)
            retrieval = len(ids) - 1
            choice = -1
            if choices is not None:
                text(self.CANDIDATES)
                # "A<i>B<i>...": a letter is one token (checked in __init__), so a candidate costs
                # n_item_tokens + 1 prompt tokens; brackets and a newline each would add three more.
                for letter, candidate in zip(LETTERS, choices[row], strict=False):
                    text(letter)
                    item(int(candidate), -1)
                text("\n" + self.ANSWER)
                choice = len(ids) - 1
            rows.append((ids, items, subs, positions, retrieval, choice))
        length = max(len(r[0]) for r in rows)

        def pad(values: list[int], fill: int) -> list[int]:
            return values + [fill] * (length - len(values))

        input_ids = torch.tensor([pad(r[0], self.pad_id) for r in rows])
        mask = torch.tensor([[1] * len(r[0]) + [0] * (length - len(r[0])) for r in rows])
        batch = PromptBatch(input_ids, mask, torch.tensor([pad(r[1], 0) for r in rows]),
                            torch.tensor([pad(r[2], 0) for r in rows]), torch.tensor([pad(r[3], -1) for r in rows]),
                            torch.tensor([r[4] for r in rows]), None, None)
        if choices is not None:
            batch.choice_index = torch.tensor([r[5] for r in rows])
            if choice_targets is not None:
                batch.choice_target = torch.as_tensor(np.asarray(choice_targets), dtype=torch.long)
        return batch
