"""The paper's published numbers (DMESR paper, Table 2 and Table 3; sampled protocol, 100 negatives).

Keys: ``(table, dataset, backbone, method, metric)``. Methods are named as in the experiment files.
"""

from __future__ import annotations

_DATASETS = ("movielens-small", "yelp", "amazon-games")
_METHODS2 = ("None", "CPMM", "QARM", "X-REFLECT", "DMESR")
# Table 2 rows: backbone -> method -> (H@10, N@10) for MovieLens, Yelp, Amazon Games.
_TABLE2: dict[str, list[tuple[float, ...]]] = {
    "sasrec": [(0.4951, 0.3307, 0.6346, 0.4373, 0.5574, 0.3710),
               (0.8426, 0.6259, 0.8139, 0.5229, 0.6387, 0.4186),
               (0.8082, 0.5883, 0.7227, 0.4888, 0.6716, 0.4544),
               (0.7426, 0.5034, 0.8039, 0.5016, 0.6334, 0.4023),
               (0.8557, 0.6361, 0.8246, 0.5471, 0.6717, 0.4500)],
    "bert4rec": [(0.6738, 0.4270, 0.7084, 0.4596, 0.5545, 0.3527),
                 (0.7787, 0.5410, 0.7890, 0.4909, 0.6045, 0.3862),
                 (0.7115, 0.4529, 0.7476, 0.4895, 0.6556, 0.4457),
                 (0.6803, 0.4318, 0.7821, 0.4708, 0.6147, 0.3833),
                 (0.7967, 0.5517, 0.8102, 0.5241, 0.6725, 0.4507)],
    "gru4rec": [(0.4951, 0.3462, 0.5259, 0.3399, 0.5081, 0.3092),
                (0.5803, 0.3860, 0.6750, 0.4084, 0.4622, 0.2753),
                (0.5164, 0.3593, 0.5567, 0.3650, 0.6048, 0.3850),
                (0.5721, 0.3550, 0.7784, 0.4710, 0.6170, 0.3823),
                (0.6180, 0.4409, 0.8042, 0.5076, 0.6402, 0.4164)],
}
_METHODS3 = ("DMESR", "wo-CL", "wo-CA", "wo-Ori-view", "wo-TWP")
# Table 3 (MovieLens): method -> (H@10, N@10) for SASRec, BERT4Rec, GRU4Rec.
_TABLE3: dict[str, tuple[float, ...]] = {
    "DMESR": (0.8557, 0.6361, 0.7967, 0.5517, 0.6180, 0.4409),
    "wo-CL": (0.8180, 0.6021, 0.7066, 0.4689, 0.5705, 0.4031),
    "wo-CA": (0.8457, 0.6391, 0.7754, 0.5473, 0.6016, 0.4031),
    "wo-Ori-view": (0.8230, 0.6109, 0.7607, 0.5175, 0.5754, 0.3960),
    "wo-TWP": (0.8393, 0.6253, 0.7164, 0.4911, 0.6328, 0.4243),
}


def _build() -> dict[tuple[str, str, str, str, str], float]:
    out: dict[tuple[str, str, str, str, str], float] = {}
    for backbone, rows in _TABLE2.items():
        for method, row in zip(_METHODS2, rows, strict=True):
            for d, dataset in enumerate(_DATASETS):
                out[("table2", dataset, backbone, method, "hit@10")] = row[2 * d]
                out[("table2", dataset, backbone, method, "ndcg@10")] = row[2 * d + 1]
    for method, row in _TABLE3.items():
        for b, backbone in enumerate(("sasrec", "bert4rec", "gru4rec")):
            out[("table3", "movielens-small", backbone, method, "hit@10")] = row[2 * b]
            out[("table3", "movielens-small", backbone, method, "ndcg@10")] = row[2 * b + 1]
    return out


PAPER_VALUES = _build()


def paper_value(table: str | None, dataset: str, backbone: str, method: str, metric: str) -> float | None:
    """The published sampled-100 value, or None where the paper reports none."""
    if table is None:
        return None
    return PAPER_VALUES.get((table, dataset, backbone, method, metric))
