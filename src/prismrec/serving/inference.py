"""Top-K for serving: one matrix product of the user vector with the precomputed item matrix, then topk.

Every model whose score is a dot product (SASRec and the other :class:`SequentialRecommender` models,
DMESR, and the item-side enhancer baselines CPMM, QARM and X-REFLECT) is put in *dot-product form*:
``user_vectors(inputs) -> (B, D)`` and a fixed ``(n_items + 1, D)`` item matrix. DMESR's is
``[e^coarse : e^fine]`` (Eq. 6): its item side is user-independent, precomputed at export time and loaded
from ``item_tables.safetensors``, so serving never runs the adapters. Its two views go through the shared
backbone as one stacked batch (one pass instead of two). The baselines
(:class:`~prismrec.models.enhancers.base.EnhancedRecommender`) store their backbone's output item matrix
(``output_items()``: every item through the baseline's encoder, computed once at export) and compute the
user side with ``user_vectors()``, which encodes only the items of the request's histories. Models without
a dot-product form (popularity) are ranked with their own ``score``. At load the dot-product form is
checked against ``model.score`` on a probe batch, so a model whose scoring differs is never mis-served.

Optional approximate search (``index="faiss"``, needs the ``faiss-cpu`` package): an HNSW inner-product
index over the item matrix. It pays off only for large catalogues: the exact product costs
``O(n_items * D)`` per request (about 1 ms for 100k items x 256 dims on one CPU core), so below a few
hundred thousand items exact search is as fast and has no recall loss.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from prismrec.evaluation.evaluators import pad_left
from prismrec.models.base import Recommender, SequentialRecommender

IndexKind = Literal["exact", "faiss"]


def last_hidden(backbone: torch.nn.Module, item_vectors: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
    """``backbone(item_vectors, padding)[:, -1]``: the last position's output, all a ranker needs.

    For SASRec's encoder in eval mode the last block runs for the last position only (its keys and values
    still cover every position): the query projection, output projection, feed-forward and norms of the
    other positions are skipped, about a third of the encoder's work at two blocks. Other backbones (and
    training mode) run whole. Same numbers up to float rounding (``Ranker.build`` checks every export).
    """
    from prismrec.models.backbones.layers import self_attention_mask
    from prismrec.models.backbones.sasrec import SASRecEncoder

    if type(backbone) is not SASRecEncoder or backbone.training:
        return backbone(item_vectors, padding)[:, -1]
    length = item_vectors.shape[1]
    keep = (~padding).unsqueeze(-1).to(item_vectors.dtype)
    positions = torch.arange(length, device=item_vectors.device)
    x = (item_vectors * math.sqrt(backbone.hidden_size) + backbone.positions(positions)[None]) * keep
    mask = self_attention_mask(padding, causal=backbone.causal)
    blocks = list(backbone.blocks)
    for block in blocks[:-1]:
        x = block(x, mask, keep)
    last = blocks[-1]
    q = last.attn_norm(x[:, -1:])
    h = q + last.attn(q, x, mask[:, :, -1:, :])
    h = last.ffn(last.ffn_norm(h)) * keep[:, -1:]
    return backbone.final_norm(h)[:, 0]


def _sasrec_user_vectors(model: SequentialRecommender) -> Callable[[torch.Tensor], torch.Tensor]:
    def user_vectors(inputs: torch.Tensor) -> torch.Tensor:
        return last_hidden(model.backbone, model.item_encoder(inputs), inputs == 0)

    return user_vectors


def _dmesr_parts(model: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    with torch.no_grad():
        return model.item_tables()


def item_tensors(model: Recommender) -> dict[str, torch.Tensor]:
    """The user-independent item tensors an export stores (empty when the model has no dot-product form)."""
    from prismrec.models.enhancers.base import EnhancedRecommender
    from prismrec.models.enhancers.dmesr import DMESR

    if isinstance(model, DMESR):
        coarse, fine = _dmesr_parts(model)
        out = {"coarse": coarse}
        if fine is not None:
            out["fine"] = fine
        out["scoring"] = coarse if fine is None else torch.cat([coarse, fine], dim=-1)
        return out
    if isinstance(model, SequentialRecommender) and type(model).score is SequentialRecommender.score:
        return {"scoring": model.output_items()}
    if isinstance(model, EnhancedRecommender):
        return {"scoring": model.output_items()}
    return {}


def _dmesr_user_vectors(model: Any, coarse: torch.Tensor, fine: torch.Tensor | None
                        ) -> Callable[[torch.Tensor], torch.Tensor]:
    """u = [u^coarse : u^fine] for DMESR (Eq. 5-6), both views through the shared backbone in one pass."""

    def user_vectors(inputs: torch.Tensor) -> torch.Tensor:
        padding = inputs == 0
        coarse_seq = coarse[inputs]
        if fine is None:
            return last_hidden(model.backbone, coarse_seq, padding)
        fine_seq = fine[inputs]
        if not model.config.without_cross_attention:
            coarse_seq, fine_seq = model.cross_attention(coarse_seq, fine_seq, padding)
        batch = inputs.shape[0]
        hidden = last_hidden(model.backbone, torch.cat([coarse_seq, fine_seq]), padding.repeat(2, 1))
        return torch.cat([hidden[:batch], hidden[batch:]], dim=-1)

    return user_vectors


@dataclass
class TopK:
    items: np.ndarray  # (k,) internal ids, best first
    scores: np.ndarray  # (k,) float32


class Ranker:
    """Ranks items for histories of internal ids (exact dot product + topk, or the model's own score)."""

    def __init__(self, model: Recommender, user_vectors: Callable[[torch.Tensor], torch.Tensor] | None,
                 item_matrix: torch.Tensor | None, index: IndexKind = "exact") -> None:
        self.model = model
        self.max_len = int(model.max_len)
        self.user_vectors = user_vectors
        # Kept as a contiguous (D, n_items + 1) matrix: a (B, D) x (D, N) product is about 2x faster on CPU
        # than one with the transposed view of the (N, D) table; ``item_matrix`` is a view of it (no copy).
        self.item_matrix_t = item_matrix.T.contiguous() if item_matrix is not None else None
        self.item_matrix = self.item_matrix_t.T if self.item_matrix_t is not None else None
        self.n_items = int(item_matrix.shape[0] - 1) if item_matrix is not None else None
        self.index_kind: IndexKind = index
        self.tables: dict[str, torch.Tensor] = {}  # the export's item tables (DMESR: coarse, fine, scoring)
        # One ranking at a time on this model: explanations add forward hooks, which must not appear or
        # vanish while another thread runs the same modules.
        self.lock = threading.RLock()
        self.faiss_index = None
        if index == "faiss":
            if item_matrix is None:
                raise ValueError(f"{type(model).__name__} has no dot-product form; faiss search is not possible")
            self.faiss_index = build_faiss_index(item_matrix)

    @property
    def mode(self) -> str:
        return "dot-product" if self.user_vectors is not None else "model-score"

    @classmethod
    def build(cls, model: Recommender, tables: dict[str, torch.Tensor], index: IndexKind = "exact") -> Ranker:
        from prismrec.models.enhancers.base import EnhancedRecommender
        from prismrec.models.enhancers.dmesr import DMESR

        model.eval()
        user_vectors = None
        matrix = tables.get("scoring")
        if isinstance(model, DMESR) and "coarse" in tables and matrix is not None:
            user_vectors = _dmesr_user_vectors(model, tables["coarse"], tables.get("fine"))
        elif (isinstance(model, SequentialRecommender) and matrix is not None
              and type(model).user_vectors is SequentialRecommender.user_vectors):
            user_vectors = _sasrec_user_vectors(model)
        elif isinstance(model, SequentialRecommender | EnhancedRecommender) and matrix is not None:
            user_vectors = model.user_vectors
        ranker = cls(model, user_vectors, matrix if user_vectors is not None else None, index=index)
        if user_vectors is not None and not ranker.agrees_with_model():
            # The stored form does not reproduce the model's own scores: fall back to model.score.
            ranker = cls(model, None, None)
        ranker.tables = dict(tables)
        return ranker

    @torch.inference_mode()
    def agrees_with_model(self, tolerance: float = 1e-3) -> bool:
        n_items = int(self.item_matrix.shape[0] - 1) if self.item_matrix is not None else 1
        generator = torch.Generator().manual_seed(0)
        probe = torch.randint(1, n_items + 1, (2, self.max_len), generator=generator)
        probe[1, : self.max_len // 2] = 0
        device = self.item_matrix.device if self.item_matrix is not None else torch.device("cpu")
        probe = probe.to(device)
        fast = self._scores(probe)
        reference = self.model.score(probe, None).float()
        scale = max(float(reference.abs().max()), 1.0)
        return fast.shape == reference.shape and float((fast - reference).abs().max()) <= tolerance * scale

    def _scores(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.user_vectors is None or self.item_matrix is None:
            # clone: a model may return a view of its own state (popularity expands its counts)
            return self.model.score(inputs, None).float().clone()
        return self.user_vectors(inputs) @ self.item_matrix_t

    def inputs(self, histories: list[np.ndarray]) -> torch.Tensor:
        device = self.item_matrix.device if self.item_matrix is not None else torch.device("cpu")
        return pad_left(histories, self.max_len).to(device)

    @torch.inference_mode()
    def top_k(self, histories: list[np.ndarray], k: int, exclude_seen: bool | list[bool] = True,
              candidates: list[np.ndarray | None] | None = None) -> list[TopK]:
        """Best ``k`` items per history (internal ids, never padding, without seen items if asked).

        ``exclude_seen``: one flag for all histories or one per history. ``candidates``: per history, the
        only internal ids that may be returned (None in a row: every item).
        """
        with self.lock:
            return self._top_k(histories, k, exclude_seen, candidates)

    def _top_k(self, histories: list[np.ndarray], k: int, exclude_seen: bool | list[bool],
               candidates: list[np.ndarray | None] | None) -> list[TopK]:
        flags = [exclude_seen] * len(histories) if isinstance(exclude_seen, bool) else list(exclude_seen)
        inputs = self.inputs(histories)
        restricted = candidates is not None and any(c is not None for c in candidates)
        if self.faiss_index is not None and not restricted:
            return self._faiss_top_k(inputs, histories, k, flags)
        scores = self._scores(inputs)
        scores[:, 0] = float("-inf")
        if restricted:
            allowed = torch.ones_like(scores, dtype=torch.bool)
            for row, cands in enumerate(candidates or []):
                if cands is not None:
                    allowed[row] = False
                    allowed[row, torch.tensor(cands, dtype=torch.long, device=scores.device)] = True
            scores = scores.masked_fill(~allowed, float("-inf"))
        for row, history in enumerate(histories):
            if flags[row] and len(history):
                scores[row, torch.tensor(history, dtype=torch.long, device=scores.device)] = float("-inf")
        k = min(k, scores.shape[1] - 1)
        values, indices = torch.topk(scores, k, dim=1)
        out = []
        for row in range(len(histories)):
            keep = torch.isfinite(values[row])
            out.append(TopK(indices[row][keep].cpu().numpy(), values[row][keep].cpu().numpy().astype(np.float32)))
        return out

    def _faiss_top_k(self, inputs: torch.Tensor, histories: list[np.ndarray], k: int,
                     exclude_seen: list[bool]) -> list[TopK]:
        users = self.user_vectors(inputs).float().cpu().numpy()  # type: ignore[misc]
        out = []
        for row, history in enumerate(histories):
            seen = set(history.tolist()) if exclude_seen[row] else set()
            fetch = k + len(seen) + 1
            scores, ids = self.faiss_index.search(users[row: row + 1], fetch)  # type: ignore[union-attr]
            picked = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True)
                      if i > 0 and int(i) not in seen][:k]
            out.append(TopK(np.array([i for i, _ in picked], dtype=np.int64),
                            np.array([s for _, s in picked], dtype=np.float32)))
        return out


def build_faiss_index(item_matrix: torch.Tensor, neighbours: int = 32) -> Any:
    """HNSW inner-product index over the item matrix (row i = internal item i; row 0 is padding)."""
    try:
        import faiss
    except ImportError:
        raise ValueError("index='faiss' needs the faiss-cpu package (pip install faiss-cpu)") from None
    matrix = np.ascontiguousarray(item_matrix.detach().float().cpu().numpy())
    index = faiss.IndexHNSWFlat(matrix.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = 128
    index.add(matrix)
    return index


class MicroBatcher:
    """Ranks the requests that arrive while the model is busy together, in one batch, with no added wait.

    A single consumer per export takes whatever is queued (up to ``max_batch``) and ranks it in a worker
    thread; under load, one batched forward pass replaces many single ones (the per-call overhead of the
    backbone dominates at batch size 1), and at concurrency 1 every request is its own batch.
    """

    def __init__(self, ranker: Ranker, max_batch: int = 64) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.ranker = ranker
        self.max_batch = max_batch
        self._queue: Any = None
        self._task: Any = None
        self.largest_batch = 0  # observability: how much batching the load produced
        # One dedicated thread ranks (and explains) for this export: the default pool would spread the work over
        # up to cpu + 4 threads, each with its own malloc arena, and the server's RSS would grow with each.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prismrec-rank")

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """Run ``function(*args)`` on this export's ranking thread."""
        import asyncio

        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)

    async def submit(self, history: np.ndarray, k: int, exclude_seen: bool,
                     candidates: np.ndarray | None = None) -> TopK:
        import asyncio

        if self._task is None or self._task.done():
            self._queue = asyncio.Queue()
            self._task = asyncio.get_running_loop().create_task(self._consume())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((history, k, exclude_seen, candidates, future))
        return await future

    async def _consume(self) -> None:

        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self.run(self._rank, batch)
            except Exception as exc:  # every waiting request gets the error, the consumer lives on
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (*_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)

    def _rank(self, batch: list[tuple]) -> list[TopK]:
        self.largest_batch = max(self.largest_batch, len(batch))
        k = max(item[1] for item in batch)
        candidates = [item[3] for item in batch]
        tops = self.ranker.top_k([item[0] for item in batch], k, [item[2] for item in batch],
                                 candidates if any(c is not None for c in candidates) else None)
        return [TopK(top.items[: item[1]], top.scores[: item[1]]) for top, item in zip(tops, batch, strict=True)]
