"""LLM-as-recommender paradigms: the language model itself ranks the candidates.

* :mod:`~prismrec.llmrec.mllm_msr`: MLLM-MSR (recurrent user-preference summaries, a LoRA-tuned yes/no
  recommender scored p(yes) / (p(yes) + p(no)));
* :mod:`~prismrec.llmrec.speeder`: Speeder (each item compressed into soft tokens by a mixture of modality
  experts, staged training, position cues);
* :mod:`~prismrec.llmrec.causal_lm`: the causal-LM plumbing both use (loading a local model or the packaged
  SmolLM2 GGUF, LoRA adapters saved as safetensors, chat prompts, yes/no scoring, image inputs for
  Qwen2.5-VL), shared with the ``local-llm`` and ``transformers`` semantic backends.

These models do not go through :class:`~prismrec.training.Trainer`, the backbone interface or the model
registry: each has its own run configuration, training loop and ``prismrec`` command group
(``prismrec mllm-msr``, ``prismrec speeder``), and is evaluated with the same sampled candidates as the
models in :mod:`prismrec.models`. This package imports nothing itself, so the semantic backends can use
:mod:`~prismrec.llmrec.causal_lm` without loading the recommenders.
"""
