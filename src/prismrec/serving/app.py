"""The HTTP API and the explorer page (FastAPI), over one or more loaded exports.

API (JSON; every route but ``/health``, ``/`` and ``/static`` is guarded by the bearer token when one is
set):

* ``GET /health``: status and the exports served;
* ``POST /recommend``: ``{"history": [external ids, oldest first], "k": 10, "exclude_seen": true,
  "candidates": [...]?, "model": "<export name>"?}`` -> top-k items with scores; unknown ids are
  reported in ``unknown_items`` / ``unknown_candidates`` and ignored;
* ``GET /items?query=&limit=``: title search; ``GET /items/{id}``: original attributes and the stored
  derived descriptions (textual, visual, hybrid) with the backend and model that produced them;
* ``GET /users?query=&limit=``, ``GET /users/{id}``, ``GET /users/{id}/recommendations?model=&k=``:
  a user's history (most recent first), the held-out test item, and the model's top-k on the history
  before it (hits marked);
* ``GET /images/{path}``: a poster, only one that an export names, only from inside the dataset root;
* ``GET /metrics``: Prometheus metrics (:mod:`prismrec.serving.metrics`);
* ``GET /``: the explorer page (plain HTML + JavaScript shipped in the package; no CDN).

``"explain": true`` in ``POST /recommend`` (or ``?explain=true`` on a user's recommendations) adds to
each item the history items that contributed most to its score, why, and the derived descriptions
(:mod:`prismrec.serving.explain`).

Bounds: request body size however it is framed, header size and count, requests in flight, history and
candidate list lengths and ``k`` are limited (:class:`ServerLimits`, enforced by
:class:`~prismrec.serving.limits.RequestGuard`); breaking one gives a 4xx (or 503) answer that says which
bound. Slow clients and endless heads are cut by the protocol layer (:mod:`prismrec.serving.server`).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr

from prismrec.data.errors import DataError
from prismrec.data.paths import safe_join
from prismrec.serving.explain import Contribution, explain, reason
from prismrec.serving.export import Export
from prismrec.serving.inference import MicroBatcher
from prismrec.serving.limits import MODEL_SCOPE_KEY, RequestGuard, ServerLimits
from prismrec.serving.metrics import server_metrics

STATIC = Path(__file__).resolve().parent / "static"
ItemId = StrictStr | StrictInt
ROUTES = ("textual", "visual", "hybrid")


__all__ = ["RecommendRequest", "ServerLimits", "create_app"]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemId] = Field(..., description="the user's recent items (external ids), oldest first")
    k: int = Field(10, description="how many items to return")
    exclude_seen: bool = Field(True, description="never recommend an item of the history")
    candidates: list[ItemId] | None = Field(None, description="rank only these items (external ids)")
    model: str | None = Field(None, description="export name (default: the first one served)")
    explain: bool = Field(False, description="name the history items behind each recommended item, and why")
    explain_top: int = Field(3, ge=1, le=20, description="history items named per recommended item")


class HistoryReason(BaseModel):
    item_id: str
    title: str
    position: int = Field(..., description="index of the item in the request's history")
    score_drop: float = Field(..., description="score(history) - score(history without this item)")
    attention: float | None = None
    cross_attention: dict[str, float] | None = None
    similarity: dict[str, float] | None = None
    reason: str
    description: dict[str, str | None] | None = None
    image_url: str | None = None


class ScoredItem(BaseModel):
    item_id: str
    title: str
    score: float
    image_url: str | None = None
    description: dict[str, str | None] | None = None
    because: list[HistoryReason] | None = None


class RecommendResponse(BaseModel):
    model: str
    items: list[ScoredItem]
    unknown_items: list[str] = Field(default_factory=list)
    unknown_candidates: list[str] = Field(default_factory=list)


@dataclass
class ServerState:
    exports: dict[str, Export]
    limits: ServerLimits
    token: str | None = None
    images: dict[str, Path] = field(default_factory=dict)  # relative poster path -> dataset root

    @property
    def default(self) -> Export:
        return next(iter(self.exports.values()))

    def export(self, name: str | None) -> Export:
        if name is None:
            return self.default
        if name not in self.exports:
            raise HTTPException(404, f"unknown model {name!r}; served: {', '.join(self.exports)}")
        return self.exports[name]

    def description(self, export: Export, external_id: str) -> dict[str, str | None] | None:
        """The derived descriptions of an item: from ``export`` if it has them, else any served export's."""
        for candidate in (export, *self.exports.values()):
            record = candidate.descriptions.get(external_id)
            if record is not None:
                return {route: record.get(route) for route in ROUTES}
        return None

    def reasons(self, export: Export, named: list[Contribution], positions: list[int]) -> list[HistoryReason]:
        """API form of an item's contributions; ``positions`` maps internal history positions to the request's."""
        out = []
        for c in named:
            external = export.external(c.item)
            out.append(HistoryReason(item_id=external, title=export.title(c.item), position=positions[c.position],
                                     score_drop=c.score_drop, attention=c.attention, cross_attention=c.cross_attention,
                                     similarity=c.similarity, reason=reason(c),
                                     description=self.description(export, external),
                                     image_url=image_url(export, c.item)))
        return out


def image_url(export: Export, internal: int) -> str | None:
    rel = export.image(internal)
    return f"/images/{rel}" if rel and export.data_root is not None else None


def item_summary(export: Export, internal: int) -> dict[str, Any]:
    attrs = export.attributes(internal)
    return {"item_id": export.external(internal), "title": export.title(internal), "year": attrs.get("year"),
            "image_url": image_url(export, internal)}


def _bounded(name: str, values: list[Any] | None, limit: int) -> None:
    if values is not None and len(values) > limit:
        raise HTTPException(413, f"{name} has {len(values)} entries; the limit is {limit}")


def create_app(exports: list[Export], token: str | None = None, limits: ServerLimits | None = None) -> FastAPI:
    if not exports:
        raise ValueError("create_app needs at least one export")
    limits = limits or ServerLimits()
    named: dict[str, Export] = {}
    for export in exports:
        name, suffix = export.name, 1
        while name in named:
            suffix += 1
            name = f"{export.name}-{suffix}"
        export.manifest["name"] = name
        named[name] = export
    state = ServerState(named, limits, token or None)
    for export in exports:
        if export.data_root is None:
            continue
        for rel in export.items["image"].dropna():
            state.images.setdefault(str(rel), export.data_root)

    app = FastAPI(title="prismrec", docs_url="/docs", redoc_url=None)
    app.state.prismrec = state
    bearer = HTTPBearer(auto_error=False)

    # A default value, not Annotated[...]: ``bearer`` is local, and annotations are strings here.
    def require_token(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:  # noqa: B008
        if state.token is None:
            return
        given = credentials.credentials if credentials is not None else ""
        if not hmac.compare_digest(given.encode(), state.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(require_token)]

    app.add_middleware(RequestGuard, limits=limits)  # type: ignore[arg-type]
    metrics = server_metrics()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            where = next(e for e in errors if e.get("type") == "json_invalid")
            position = where.get("loc", ["body", "?"])[-1]
            detail = where.get("ctx", {}).get("error", "invalid JSON")
            return JSONResponse({"detail": f"malformed JSON body at character {position}: {detail}"},
                                status_code=400)
        readable = [{"field": ".".join(str(p) for p in e.get("loc", ()) if p != "body"), "problem": e.get("msg")}
                    for e in errors]
        return JSONResponse({"detail": "invalid request", "errors": readable}, status_code=422)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "auth_required": state.token is not None,
                "models": [{"name": name, "model": e.manifest["model"], "n_items": e.n_items,
                            "n_users": len(e.user_ids), "dataset": e.manifest.get("dataset"),
                            "semantics": e.manifest.get("semantics"), "ranking": e.ranker.mode,
                            "index": e.ranker.index_kind}
                           for name, e in state.exports.items()],
                "limits": vars(limits)}

    batchers = {name: MicroBatcher(export.ranker) for name, export in named.items()}
    app.state.batchers = batchers

    @app.get("/metrics", dependencies=guarded)
    def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    def check_explain_k(k: int) -> None:
        if k > limits.max_explained_items:
            raise HTTPException(422, f"explanations are given for at most {limits.max_explained_items} items "
                                     f"(k = {k}); lower k or drop explain")

    @app.post("/recommend", dependencies=guarded)
    async def recommend(request: RecommendRequest, http: Request) -> RecommendResponse:
        export = state.export(request.model)
        http.scope[MODEL_SCOPE_KEY] = export.name
        _bounded("history", request.history, limits.max_history)
        _bounded("candidates", request.candidates, limits.max_candidates)
        if not 1 <= request.k <= limits.max_k:
            raise HTTPException(422, f"k must be between 1 and {limits.max_k} (got {request.k})")
        if request.explain:
            check_explain_k(request.k)
        if not request.history:
            raise HTTPException(422, "history is empty: give at least one item id the user interacted with")
        known = [export.item_index.get(str(i)) for i in request.history]
        unknown = [str(i) for i, k in zip(request.history, known, strict=True) if k is None]
        history = np.array([k for k in known if k is not None], dtype=np.int64)
        positions = [p for p, k in enumerate(known) if k is not None]  # internal position -> request position
        if not len(history):
            raise HTTPException(422, f"none of the history's {len(unknown)} item id(s) is known to model "
                                     f"{export.name!r} (e.g. {unknown[:5]})")
        candidates = None
        unknown_candidates: list[str] = []
        if request.candidates is not None:
            mapped = [export.item_index.get(str(i)) for i in request.candidates]
            unknown_candidates = [str(i) for i, k in zip(request.candidates, mapped, strict=True) if k is None]
            candidates = np.array([k for k in mapped if k is not None], dtype=np.int64)
            if not len(candidates):
                raise HTTPException(422, "none of the candidate item ids is known "
                                         f"(e.g. {unknown_candidates[:5]})")
        top = await batchers[export.name].submit(history, request.k, request.exclude_seen, candidates)
        items = [ScoredItem(item_id=export.external(int(i)), title=export.title(int(i)), score=float(s),
                            image_url=image_url(export, int(i))) for i, s in zip(top.items, top.scores, strict=True)]
        if request.explain:
            named = await batchers[export.name].run(explain, export.ranker, history, top.items,
                                                    request.explain_top, export.ranker.tables)
            for item, contributions in zip(items, named, strict=True):
                item.description = state.description(export, item.item_id)
                item.because = state.reasons(export, contributions, positions)
        return RecommendResponse(model=export.name, items=items, unknown_items=unknown,
                                 unknown_candidates=unknown_candidates)

    @app.get("/items", dependencies=guarded)
    def search_items(query: Annotated[str, Query(max_length=200)] = "",
                     limit: Annotated[int, Query(ge=1)] = 20) -> dict[str, Any]:
        export = state.default
        limit = min(limit, limits.max_search_results)
        needle = query.strip().lower()
        titles = export.items["attr_title"] if "attr_title" in export.items else export.items["external_id"]
        lowered = titles.fillna("").astype(str).str.lower()
        if needle:
            starts = lowered.str.startswith(needle)
            contains = lowered.str.contains(needle, regex=False)
            order = np.concatenate([np.flatnonzero(starts), np.flatnonzero(contains & ~starts)])
        else:
            order = np.arange(len(lowered))
        hits = [item_summary(export, int(row) + 1) for row in order[:limit]]
        return {"query": query, "total": len(order), "items": hits}

    @app.get("/items/{item_id}", dependencies=guarded)
    def item_detail(item_id: str) -> dict[str, Any]:
        owner = next((e for e in state.exports.values() if item_id in e.item_index), None)
        if owner is None:
            raise HTTPException(404, f"unknown item id {item_id!r}")
        internal = owner.item_index[item_id]
        derived = []
        for name, export in state.exports.items():
            record = export.descriptions.get(item_id)
            if record is None:
                continue
            semantics = export.semantics or {}
            backend = semantics.get("backend") or {}
            derived.append({"model": name, "artefact": semantics.get("name"),
                            "backend": backend.get("backend"), "backend_model": backend.get("model"),
                            "embedder": (semantics.get("embedder") or {}).get("model"),
                            "descriptions": {route: record.get(route) for route in ROUTES},
                            "status": {route: record.get(f"{route}_status") for route in ROUTES},
                            "original_text": record.get("original")})
        return {**item_summary(owner, internal), "attributes": owner.attributes(internal), "derived": derived}

    @app.get("/users", dependencies=guarded)
    def list_users(query: Annotated[str, Query(max_length=200)] = "",
                   limit: Annotated[int, Query(ge=1)] = 50) -> dict[str, Any]:
        export = state.default
        limit = min(limit, limits.max_search_results)
        matching = [u for u in export.user_ids if u.startswith(query.strip())]
        return {"total": len(matching), "users": matching[:limit]}

    def _user(export: Export, user_id: str) -> np.ndarray:
        if user_id not in export.user_index:
            raise HTTPException(404, f"unknown user id {user_id!r} for model {export.name!r}")
        return export.histories[export.user_index[user_id]]

    @app.get("/users/{user_id}", dependencies=guarded)
    def user_detail(user_id: str) -> dict[str, Any]:
        export = state.default
        history = _user(export, user_id)
        test_item = item_summary(export, int(history[-1])) if len(history) >= 3 else None
        shown = history[:-1] if test_item is not None else history
        return {"user_id": user_id, "n_interactions": len(history), "test_item": test_item,
                "history": [item_summary(export, int(i)) for i in shown[::-1]]}

    @app.get("/users/{user_id}/recommendations", dependencies=guarded)
    def user_recommendations(user_id: str, http: Request, model: str | None = None,
                             k: Annotated[int, Query(ge=1)] = 10, explain_items: bool = Query(False, alias="explain")
                             ) -> dict[str, Any]:
        export = state.export(model)
        http.scope[MODEL_SCOPE_KEY] = export.name
        if k > limits.max_k:
            raise HTTPException(422, f"k must be between 1 and {limits.max_k} (got {k})")
        if explain_items:
            check_explain_k(k)
        history = _user(export, user_id)
        has_test = len(history) >= 3
        inputs = history[:-1] if has_test else history
        test = int(history[-1]) if has_test else None
        top = export.ranker.top_k([inputs], k, exclude_seen=True)[0]
        items = [{**item_summary(export, int(i)), "score": float(s), "hit": test is not None and int(i) == test}
                 for i, s in zip(top.items, top.scores, strict=True)]
        if explain_items:
            named = explain(export.ranker, inputs, top.items, 3, export.ranker.tables)
            # positions index the history as /users/{id} lists it: most recent first, test item left out
            newest_first = list(range(len(inputs) - 1, -1, -1))
            for item, contributions in zip(items, named, strict=True):
                item["description"] = state.description(export, item["item_id"])
                item["because"] = [r.model_dump() for r in state.reasons(export, contributions, newest_first)]
        hit_rank = next((r + 1 for r, it in enumerate(items) if it["hit"]), None)
        return {"model": export.name, "model_type": export.manifest["model"], "user_id": user_id,
                "test_item": item_summary(export, test) if test is not None else None, "items": items,
                "hit_rank": hit_rank}

    @app.get("/images/{path:path}", dependencies=guarded)
    def image(path: str) -> Response:
        if path.startswith("/") or "\\" in path or ".." in Path(path).parts:
            raise HTTPException(400, "image paths are relative to the dataset root and may not leave it")
        root = state.images.get(path)
        if root is None:
            raise HTTPException(404, "no such image")
        try:
            file = safe_join(root, path)
        except DataError:
            raise HTTPException(400, "image path leaves the dataset root") from None
        if not file.is_file():
            raise HTTPException(404, "image file missing under the dataset root")
        return FileResponse(file, headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text(encoding="utf-8"),
                            headers={"Cache-Control": "no-cache"})

    @app.get("/static/{name}")
    def static(name: str) -> Response:
        allowed = {"app.js": "text/javascript", "app.css": "text/css"}
        if name not in allowed:
            raise HTTPException(404, "no such file")
        return FileResponse(STATIC / name, media_type=allowed[name], headers={"Cache-Control": "no-cache"})

    return app
