"""Semantic enhancers: models that wrap a backbone and feed it item vectors derived from MLLM semantics.

* :mod:`~prismrec.models.enhancers.dmesr`: DMESR, the paper's dual-view enhancer (Eq. 1-8);
* :mod:`~prismrec.models.enhancers.cpmm`, :mod:`~prismrec.models.enhancers.qarm`,
  :mod:`~prismrec.models.enhancers.xreflect`: the MLLM-based baselines of the paper's Table 2;
* their shared parts: :mod:`~prismrec.models.enhancers.base` (``EnhancerConfig``, the options every
  enhancer shares, and ``EnhancedRecommender``, a backbone recommender plus auxiliary losses),
  :mod:`~prismrec.models.enhancers.adapters` (semantic matrices from an artefact, adapters),
  :mod:`~prismrec.models.enhancers.alignment` (contrastive alignment, Eq. 2-3) and
  :mod:`~prismrec.models.enhancers.cross_attention` (bidirectional cross-attention, Eq. 5).

Every enhancer runs on every backbone (``model.backbone``) through :mod:`prismrec.models.backbones` and reads
a semantics artefact written by ``prismrec derive`` (``model.semantics``).
"""
