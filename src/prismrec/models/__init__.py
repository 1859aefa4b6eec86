"""Recommenders: one model per module, all registered in ``MODELS``."""

from prismrec.models import popularity as _popularity  # noqa: F401  (registers "popularity")
from prismrec.models import sasrec as _sasrec  # noqa: F401  (registers "sasrec")
from prismrec.models.base import IdItemEmbedding, ItemEncoder, Recommender, SequenceBackbone, SequentialRecommender
from prismrec.models.registry import MODELS

__all__ = ["MODELS", "IdItemEmbedding", "ItemEncoder", "Recommender", "SequenceBackbone", "SequentialRecommender"]
