"""Explanations: which history items made the model recommend an item, and why.

Contribution is measured, not guessed: for a history of L items (the last ``max_len`` the model reads),
the model scores L + 1 histories in one batch, the request's and each one with one item removed; an item's
**score drop** for a recommended item is ``score(full history) - score(history without it)``. The items
with the largest drops are named, each with the signals that show why the model leans on it:

* ``attention``: the weight the last position (the one whose state is the user vector) gives to the item in
  the backbone's last self-attention block, averaged over heads (SASRec; for DMESR averaged over its two
  views); None for backbones without attention (GRU4Rec);
* DMESR only: ``cross_attention`` (Eq. 5: the last position's weight on the item in the coarse-side and
  fine-side cross-attention) and ``similarity`` (cosine of the recommended item's e^coarse / e^fine with
  the history item's, the semantic vectors the score is the dot product of).

Removing the top-named item therefore lowers the recommended item's score at least as much as removing any
other single item of the history (tests/test_serving_explain.py checks it through the API); attention alone
does not have that property, which is why it is reported as a reason and not used as the ranking.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from prismrec.evaluation.evaluators import pad_left
from prismrec.serving.inference import Ranker


@dataclass
class Contribution:
    position: int  # index into the history given (internal ids, oldest first)
    item: int  # internal id
    score_drop: float
    attention: float | None = None
    cross_attention: dict[str, float] | None = None
    similarity: dict[str, float] | None = None


class _Capture:
    """Forward hooks that record attention weights, only for calls made on the capturing thread (other
    requests may be ranked on the same modules by other threads meanwhile)."""

    def __init__(self, model: torch.nn.Module) -> None:
        from prismrec.models.backbones.layers import MultiHeadAttention, TransformerBlock
        from prismrec.models.enhancers.cross_attention import BidirectionalCrossAttention

        self.thread = threading.get_ident()
        self.self_attention: list[torch.Tensor] = []  # per block call: (B, Lq, Lk), mean over heads
        self.cross: dict[str, torch.Tensor] = {}
        self.handles: list[Any] = []
        backbone = getattr(model, "backbone", None)
        if backbone is not None:
            for module in backbone.modules():
                if isinstance(module, TransformerBlock) and isinstance(module.attn, MultiHeadAttention):
                    self.handles.append(module.attn.register_forward_hook(self._self_hook))
        cross = getattr(model, "cross_attention", None)
        if isinstance(cross, BidirectionalCrossAttention):
            self.handles.append(cross.to_coarse.register_forward_hook(self._cross_hook("coarse")))
            self.handles.append(cross.to_fine.register_forward_hook(self._cross_hook("fine")))

    def _self_hook(self, module: Any, args: tuple, output: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        query, key_value, mask = args
        batch, q_len, dim = query.shape
        heads = module.num_heads
        q = module.q_proj(query).view(batch, q_len, heads, dim // heads).transpose(1, 2)
        k = module.k_proj(key_value).view(batch, key_value.shape[1], heads, dim // heads).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2)) / math.sqrt(dim // heads)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        self.self_attention.append(torch.softmax(logits, dim=-1).mean(dim=1))

    def _cross_hook(self, side: str) -> Any:
        def hook(module: Any, args: tuple, output: Any) -> None:
            if threading.get_ident() != self.thread:
                return
            query_view, key_view, mask = args
            logits = (module.w_q(query_view) @ module.w_k(key_view).transpose(1, 2)) * module.scale
            self.cross[side] = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1)

        return hook

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def _cosine(table: torch.Tensor, items: np.ndarray, history: np.ndarray) -> np.ndarray:
    a = torch.nn.functional.normalize(table[torch.as_tensor(items)].float(), dim=-1)
    b = torch.nn.functional.normalize(table[torch.as_tensor(history)].float(), dim=-1)
    return (a @ b.T).cpu().numpy()  # (k, L)


@torch.inference_mode()
def explain(ranker: Ranker, history: np.ndarray, items: np.ndarray, top_n: int = 3,
            tables: dict[str, torch.Tensor] | None = None) -> list[list[Contribution]]:
    """For each recommended internal id in ``items``, the ``top_n`` history items with the largest score drop.

    ``history``: the request's internal ids, oldest first; ``tables``: DMESR's ``coarse`` / ``fine`` item
    tables (for the similarity signal).
    """
    history = np.asarray(history, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    window_start = max(0, len(history) - ranker.max_len)
    positions = np.arange(window_start, len(history))
    if len(items) == 0 or len(positions) == 0:
        return [[] for _ in items]
    variants = [history] + [np.delete(history, p) for p in positions]
    inputs = pad_left(variants, ranker.max_len).to(ranker.inputs([history]).device)
    with ranker.lock, _Capture(ranker.model) as capture:
        scores = ranker._scores(inputs)
    chosen = scores[:, torch.as_tensor(items, device=scores.device)].float().cpu().numpy()  # (1 + L, k)
    drops = chosen[0][None, :] - chosen[1:]  # (L, k)
    length = len(positions)  # the window's items sit at the last `length` input positions of row 0

    attention = None
    if capture.self_attention:
        last = capture.self_attention[-1]  # the last block's call; rows: views stacked along the batch
        batch = inputs.shape[0]
        rows = [0] + ([batch] if last.shape[0] == 2 * batch else [])
        attention = torch.stack([last[r, -1, -length:] for r in rows]).mean(dim=0).cpu().numpy()
    cross = {side: weights[0, -1, -length:].cpu().numpy() for side, weights in capture.cross.items()}
    window = history[positions]
    similarity = {side: _cosine(tables[side], items, window) for side in ("coarse", "fine")
                  if tables is not None and side in tables}

    out: list[list[Contribution]] = []
    for j in range(len(items)):
        order = np.argsort(-drops[:, j], kind="stable")[:top_n]
        named = []
        for idx in order:
            named.append(Contribution(
                position=int(positions[idx]), item=int(window[idx]), score_drop=float(drops[idx, j]),
                attention=float(attention[idx]) if attention is not None else None,
                cross_attention={s: float(w[idx]) for s, w in cross.items()} or None,
                similarity={s: float(m[j, idx]) for s, m in similarity.items()} or None))
        out.append(named)
    return out


def reason(c: Contribution) -> str:
    """One line a person can read: what removing the item does and what the model's weights say."""
    parts = [f"without it the score drops by {c.score_drop:.3g}" if c.score_drop >= 0
             else f"without it the score rises by {-c.score_drop:.3g}"]
    if c.attention is not None:
        parts.append(f"last-position attention {c.attention:.2f}")
    if c.cross_attention:
        parts.append("cross-attention " + " / ".join(f"{s} {w:.2f}" for s, w in c.cross_attention.items()))
    if c.similarity:
        parts.append("semantic similarity " + " / ".join(f"{s} {v:.2f}" for s, v in c.similarity.items()))
    return "; ".join(parts)
