"""The ID-based sequence backbones: SASRec, BERT4Rec, GRU4Rec ("None" in the paper's tables).

Each module is one model (its config, its encoder, its recommender, registered in
:data:`prismrec.models.MODELS`); :mod:`~prismrec.models.backbones.layers` holds the Transformer layers
SASRec and BERT4Rec share. :mod:`~prismrec.models.backbones.registry` names the encoders in
:data:`BACKBONES` so that an enhancer can run on any of them over its own item vectors
(:func:`build_recommender`). What belongs here: a sequence encoder that reads (B, L, d) item vectors and
a padding mask and returns (B, L, d) hidden states, and the recommender that trains it on ID embeddings.
"""

from prismrec.models.backbones.registry import (
    BACKBONES,
    BackboneOptions,
    BackboneSpec,
    Objective,
    build_backbone,
    build_recommender,
)

__all__ = ["BACKBONES", "BackboneOptions", "BackboneSpec", "Objective", "build_backbone", "build_recommender"]
