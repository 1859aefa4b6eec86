from __future__ import annotations

import torch

from prismrec.models.backbones.layers import self_attention_mask
from prismrec.models.backbones.sasrec import SASRec, SASRecConfig


def _model(**kw) -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(hidden_size=16, num_blocks=2, num_heads=2, max_len=8, **kw), n_items=30).eval()


def test_causal_mask_future_items_do_not_change_the_past():
    model = _model()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([11, 12, 13])
    with torch.no_grad():
        a, b = model.encode(seq), model.encode(changed)
    assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
    assert not torch.allclose(a[0, 5:], b[0, 5:], atol=1e-4)


def test_padding_does_not_change_real_positions():
    model = _model()
    short = torch.tensor([[0, 0, 0, 0, 5, 6, 7, 8]])
    with torch.no_grad():
        h = model.encode(short)
        # Different content behind the padding is impossible (it is padding), but the padded rows must be
        # finite and zero before the final norm; the real rows must not be NaN.
    assert torch.isfinite(h).all()


def test_mask_hides_padding_keys_but_never_leaves_a_row_empty():
    padding = torch.tensor([[True, True, False, False]])
    mask = self_attention_mask(padding, causal=True)[0, 0]
    assert mask.sum(dim=1).min() >= 1
    assert not mask[2, 0] and not mask[2, 1] and mask[2, 2] and not mask[2, 3]
    assert mask[3, 2] and mask[3, 3]


def test_score_modes_agree():
    model = _model()
    seq = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 9, 8, 7, 6]])
    with torch.no_grad():
        full = model.score(seq, None)
        cands = torch.tensor([[1, 5, 29], [2, 3, 4]])
        part = model.score(seq, cands)
    assert full.shape == (2, 31)
    assert torch.allclose(full.gather(1, cands), part, atol=1e-5)


def test_both_losses_train():
    import numpy as np

    torch.manual_seed(0)
    model = SASRec(SASRecConfig(hidden_size=16, num_blocks=1, max_len=8, dropout=0.0), n_items=30)
    rng = np.random.default_rng(0)
    seqs = [np.array([1, 2, 3, 4, 5, 6]), np.array([7, 8, 9, 10])]
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for loss_name in ("bce", "ce"):
        first = last = None
        for _ in range(30):
            batch = model.training_batch(seqs, rng)
            loss = model.training_loss(batch, loss_name)
            opt.zero_grad()
            loss.backward()
            opt.step()
            first = float(loss) if first is None else first
            last = float(loss)
        assert last < first
    batch = model.training_batch(seqs, rng)
    # Sampled negatives are never in the user's own sequence, and are 0 exactly where there is no target.
    assert not np.isin(batch["negatives"][0].numpy(), seqs[0]).any()
    assert torch.equal(batch["negatives"] == 0, batch["targets"] == 0)
