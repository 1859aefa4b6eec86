"""Explanations through the HTTP API (a real uvicorn server on 127.0.0.1), for DMESR and SASRec.

Over many requests (real MovieLens histories): every named history item is an item of the request, at
the position named; and removing the top-named item lowers the recommended item's score more than
removing a random item of the history, checked by asking the server again with the shortened histories.
"""

from __future__ import annotations

import numpy as np
import pytest

from prismrec.serving import load_export
from prismrec.serving.app import create_app
from serving_fixtures import SHARED_DATA_PRESENT, LiveServer, serving_runs

pytestmark = pytest.mark.skipif(not SHARED_DATA_PRESENT, reason="../shared/data/movielens-small is not present")
N_REQUESTS = 40


@pytest.fixture(scope="module")
def served():
    runs = serving_runs()
    exports = [load_export(runs.sasrec_export), load_export(runs.dmesr_export)]
    with LiveServer(create_app(exports)) as live:
        yield live, exports


def _score(client, model: str, history: list[str], item: str) -> float:
    answer = client.post("/recommend", json={"history": history, "k": 1, "candidates": [item], "model": model,
                                             "exclude_seen": False})
    assert answer.status_code == 200, answer.text
    (only,) = answer.json()["items"]
    assert only["item_id"] == item
    return only["score"]


@pytest.mark.parametrize("model", ["export-sasrec", "export-dmesr"])
def test_named_items_are_the_requests_and_removing_the_top_one_costs_more_than_a_random_one(served, model):
    import httpx

    live, exports = served
    export = next(e for e in exports if e.name == model)
    rng = np.random.default_rng(7)
    users = rng.choice(len(export.histories), size=N_REQUESTS, replace=False)
    top_drops, random_drops = [], []
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for user in users:
            history = [export.external(int(i)) for i in export.histories[user][-int(rng.integers(5, 30)):]]
            answer = client.post("/recommend", json={"history": history, "k": 5, "model": model, "explain": True,
                                                     "explain_top": 3})
            assert answer.status_code == 200, answer.text
            items = answer.json()["items"]
            assert len(items) == 5
            for item in items:
                because = item["because"]
                assert 1 <= len(because) <= 3
                for named in because:
                    assert 0 <= named["position"] < len(history)
                    assert history[named["position"]] == named["item_id"]  # a real item of this request
                    assert named["reason"].startswith("without it the score")
                    assert 0.0 <= named["attention"] <= 1.0
                drops = [n["score_drop"] for n in because]
                assert drops == sorted(drops, reverse=True)
                if model == "export-dmesr":
                    assert set(because[0]["similarity"]) == {"coarse", "fine"}
                    assert set(because[0]["cross_attention"]) == {"coarse", "fine"}
                    assert because[0]["description"]["textual"].startswith("TEXTUAL view of")
                    assert item["description"]["visual"].startswith("VISUAL view of")
                else:
                    assert because[0]["similarity"] is None and because[0]["cross_attention"] is None
            # the server's own scores, with the top-named item and with a random item removed
            first = items[0]
            top = first["because"][0]["position"]
            other = int(rng.integers(0, len(history)))
            full = _score(client, model, history, first["item_id"])
            assert abs(full - first["score"]) < 1e-4
            without_top = _score(client, model, history[:top] + history[top + 1:], first["item_id"])
            without_other = _score(client, model, history[:other] + history[other + 1:], first["item_id"])
            assert abs((full - without_top) - first["because"][0]["score_drop"]) < 1e-3
            top_drops.append(full - without_top)
            random_drops.append(full - without_other)
    top_drops_, random_drops_ = np.array(top_drops), np.array(random_drops)
    # never less than a random removal (ties when the random pick is the top one), and more on average
    assert (top_drops_ >= random_drops_ - 1e-4).all()
    assert top_drops_.mean() > random_drops_.mean()
    assert (top_drops_ > random_drops_ + 1e-6).mean() >= 0.5


def test_explain_is_bounded_and_available_for_a_users_recommendations(served):
    import httpx

    live, exports = served
    export = exports[1]
    user = export.user_ids[0]
    with httpx.Client(base_url=live.url, timeout=60) as client:
        history = [export.external(int(i)) for i in export.histories[0][-10:]]
        big = client.post("/recommend", json={"history": history, "k": 200, "explain": True})
        assert big.status_code == 422 and "at most 50 items" in big.json()["detail"]
        shown = client.get(f"/users/{user}").json()["history"]  # most recent first
        recs = client.get(f"/users/{user}/recommendations", params={"model": export.name, "explain": "true"}).json()
        for item in recs["items"]:
            for named in item["because"]:
                assert shown[named["position"]]["item_id"] == named["item_id"]
