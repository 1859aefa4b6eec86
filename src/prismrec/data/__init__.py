"""Loading, filtering and splitting interaction data with item catalogues."""

from prismrec.data import amazon as _amazon  # noqa: F401  (registers amazon, amazon-games)
from prismrec.data import generic as _generic  # noqa: F401  (registers generic)
from prismrec.data import movielens as _movielens  # noqa: F401  (registers the loader)
from prismrec.data import yelp as _yelp  # noqa: F401  (registers yelp)
from prismrec.data.dataset import PAD_ITEM, RawDataset, SequenceDataset, build_sequences, k_core_filter
from prismrec.data.errors import DataError, DatasetNotFoundError
from prismrec.data.loaders import DATASETS, load_raw, load_sequences
from prismrec.data.movielens import MovieLensSmall

__all__ = [
    "DATASETS",
    "PAD_ITEM",
    "DataError",
    "DatasetNotFoundError",
    "MovieLensSmall",
    "RawDataset",
    "SequenceDataset",
    "build_sequences",
    "k_core_filter",
    "load_raw",
    "load_sequences",
]
