from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prismrec.data.dataset import SequenceDataset
from prismrec.models.enhancers.adapters import load_semantic_matrices
from prismrec.models.enhancers.alignment import one_way_contrastive, symmetric_contrastive
from prismrec.models.enhancers.dmesr import DMESR, DMESRConfig
from semantics_fixtures import write_artefact

N_ITEMS = 20


def _matrices(dim: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for route in ("text", "visual", "hybrid", "original"):
        m = rng.normal(size=(N_ITEMS + 1, dim)).astype(np.float32)
        m[0] = 0
        out[route] = m
    return out


def _model(**switches) -> DMESR:
    torch.manual_seed(0)
    cfg = DMESRConfig(semantics="unused", hidden_size=8, num_blocks=1, max_len=6, dropout=0.0, **switches)
    return DMESR(cfg, _matrices())


def _batch(model: DMESR) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(0)
    seqs = [np.array([1, 2, 3, 4, 5, 6, 7]), np.array([8, 9, 10]), np.array([3, 11, 12, 13, 14])]
    return model.training_batch(seqs, rng)


def test_shapes_and_score_modes_agree():
    model = _model().eval()
    inputs = torch.tensor([[0, 0, 1, 2, 3, 4], [0, 0, 0, 5, 6, 7]])
    with torch.no_grad():
        full = model.score(inputs, None)
        cands = torch.tensor([[1, 9, 20], [4, 5, 6]])
        part = model.score(inputs, cands)
    assert full.shape == (2, N_ITEMS + 1) and part.shape == (2, 3)
    assert torch.allclose(full.gather(1, cands), part, atol=1e-5)


def test_no_future_leak_through_cross_attention_and_backbone():
    model = _model().eval()
    a = torch.tensor([[0, 1, 2, 3, 4, 5]])
    b = a.clone()
    b[0, 4:] = torch.tensor([15, 16])
    with torch.no_grad():
        coarse, fine = model.item_tables()
        ha = model._user_states(a, coarse[a], fine[a])
        hb = model._user_states(b, coarse[b], fine[b])
    for x, y in zip(ha, hb, strict=True):
        assert torch.allclose(x[0, :4], y[0, :4], atol=1e-6)
        assert not torch.allclose(x[0, 4:], y[0, 4:], atol=1e-4)


def test_efficient_item_side_equals_naive_formulation():
    model = _model(alpha=0.5)
    model.train()
    batch = _batch(model)
    torch.manual_seed(1)
    fast = model.training_loss(batch, "bce")
    torch.manual_seed(1)
    naive = model.training_loss(batch, "bce", naive=True)
    assert torch.allclose(fast, naive, atol=1e-6)


def test_each_ablation_switch_changes_the_computation():
    base = _model(alpha=0.5)
    batch = _batch(base)
    base.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        reference_loss = float(base.training_loss(batch, "bce"))
        reference_scores = base.score(batch["inputs"], None)
    for switch in ("without_alignment", "without_cross_attention", "without_original_view", "without_three_way"):
        model = _model(alpha=0.5, **{switch: True}).eval()
        # Carry over every weight the two models share, so only the switch differs.
        shared = {k: v for k, v in base.state_dict().items() if k in model.state_dict()
                  and model.state_dict()[k].shape == v.shape}
        model.load_state_dict(shared, strict=False)
        with torch.no_grad():
            torch.manual_seed(1)
            loss = float(model.training_loss(batch, "bce"))
            scores = model.score(batch["inputs"], None)
        assert loss != pytest.approx(reference_loss, abs=1e-6) or not torch.allclose(scores, reference_scores), switch
    assert not _model(without_alignment=True).uses_alignment
    assert not _model(without_three_way=True).uses_alignment
    assert not hasattr(_model(without_original_view=True), "adapter_original")
    assert not hasattr(_model(without_cross_attention=True), "cross_attention")


def test_alignment_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tau = 2.0
    # cos(a0,b0)=1, cos(a0,b1)=1/sqrt2, cos(a1,b0)=0, cos(a1,b1)=1/sqrt2
    s = 1 / math.sqrt(2)
    paper = -((1 / tau - s / tau) + (s / tau - 0 / tau)) / 2  # log(exp(pos)/exp(the one negative))
    assert float(one_way_contrastive(a, b, tau, "paper")) == pytest.approx(paper, abs=1e-6)
    row0 = -(1 / tau - math.log(math.exp(1 / tau) + math.exp(s / tau)))
    row1 = -(s / tau - math.log(math.exp(0) + math.exp(s / tau)))
    assert float(one_way_contrastive(a, b, tau, "infonce")) == pytest.approx((row0 + row1) / 2, abs=1e-6)
    both = float(symmetric_contrastive(a, b, tau, "paper"))
    assert both == pytest.approx(paper + float(one_way_contrastive(b, a, tau, "paper")), abs=1e-6)


def test_gradient_reaches_every_adapter():
    model = _model(alpha=0.5)
    model.train()
    loss = model.training_loss(_batch(model), "bce")
    loss.backward()
    for name in ("adapter_text", "adapter_visual", "adapter_hybrid", "adapter_original"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), name
    assert all(p.grad is not None for p in model.cross_attention.parameters())


def test_item_cache_is_used_in_eval_and_dropped_in_train():
    model = _model().eval()
    first = model.item_tables()
    assert model.item_tables()[0] is first[0]
    model.train()
    assert model._item_cache is None


def test_semantics_rows_are_matched_by_external_id(tmp_path):
    external = [str(i) for i in range(100, 100 + N_ITEMS)]
    folder = write_artefact(tmp_path / "art", external, dim=5)
    # A dataset that knows the items in another order (and only some of them).
    order = ["<pad>", "105", "101", "119"]
    ds = SequenceDataset(name="x", root=tmp_path, user_ids=np.array(["u"]), item_ids=np.array(order, dtype=object),
                         sequences=[np.array([1, 2, 3])], timestamps=[np.array([1, 2, 3])], items=None,  # type: ignore[arg-type]
                         attribute_columns=[], fingerprint="f")
    from safetensors.numpy import load_file

    raw = load_file(str(folder / "embeddings.safetensors"))
    got = load_semantic_matrices(folder, ds, ["text", "original"])
    assert np.allclose(got["text"][1], raw["text"][6]) and np.allclose(got["text"][3], raw["text"][20])
    assert np.all(got["original"][0] == 0)
    bad = SequenceDataset(name="x", root=tmp_path, user_ids=np.array(["u"]),
                          item_ids=np.array(["<pad>", "999"], dtype=object), sequences=[np.array([1])],
                          timestamps=[np.array([1])], items=None, attribute_columns=[], fingerprint="f")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no semantics for 1 item"):
        load_semantic_matrices(folder, bad, ["text"])


def test_rebuild_from_saved_state_needs_no_artefact():
    model = _model().eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    again = DMESR.from_state(model.config, N_ITEMS, state).eval()
    inputs = torch.tensor([[0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.allclose(model.score(inputs, None), again.score(inputs, None))


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
def test_every_backbone_trains_and_scores(backbone):
    model = _model(backbone=backbone, alpha=0.5)
    model.train()
    batch = _batch(model)
    if backbone == "bert4rec":
        assert (batch["inputs"] == model.mask_id).any()  # cloze batches carry the mask id
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(15):
        loss = model.training_loss(_batch(model), "bce")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    model.eval()
    inputs = torch.tensor([[0, 0, 1, 2, 3, 4]])
    with torch.no_grad():
        full = model.score(inputs, None)
        part = model.score(inputs, torch.tensor([[1, 7, 20]]))
    assert full.shape == (1, N_ITEMS + 1) and torch.isfinite(full).all()
    assert torch.allclose(full[:, [1, 7, 20]], part, atol=1e-5)
