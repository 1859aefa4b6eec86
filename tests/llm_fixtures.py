"""Tiny randomly initialised causal LMs for tests of the LLM-as-recommender models (no download, < 1 s).

* :func:`tiny_tokenizer`: a byte-level BPE trained in code on a small English corpus (so any text encodes,
  and ``yes``/``no`` are single tokens), wrapped in ``PreTrainedTokenizerFast`` with a ChatML-style chat
  template, a pad token and left padding.
* :func:`tiny_causal_lm`: ``(LlamaForCausalLM, tokenizer)``, 2 layers of width 32, seeded.
* :func:`save_tiny_causal_lm`: the same written as a Hugging Face folder, for
  ``prismrec.llmrec.causal_lm.load_causal_lm`` (``CausalLMOptions(model=str(folder))``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    *["yes no yes no Yes No", "yes", "no"] * 8,
    "The user appears to have a preference for movies, films, comedy, drama, action, animation and adventure.",
    "The user has interacted with the following items in order. Summarise the user's preferences.",
    "Here is the previous summary of the user's preferences. Update the summary with the new items.",
    "Will the user interact with the candidate item? Answer yes or no.",
    "title: Toy Story; year: 1995; genres: Adventure|Animation|Children|Comedy|Fantasy",
    "A poster with bright colours, characters, a dark night sky, a city and a family.",
    "recently watched items candidate item summary description image poster attributes",
    "0 1 2 3 4 5 6 7 8 9 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'\"()[]{}<>-_/|",
]


def tiny_tokenizer(vocab_size: int = 400) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(CORPUS * 4, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<|pad|>", eos_token="<|im_end|>",
                                      bos_token="<|endoftext|>")
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.padding_side = "left"
    return wrapped


def tiny_causal_lm(seed: int = 0) -> tuple[Any, Any]:
    """A seeded 2-layer Llama (width 32) and its tokenizer, in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                         bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False,
                         # wider than the 0.02 default: with width 32 the logits would span only ~0.1, too
                         # flat for a few LoRA steps to move p(yes) visibly
                         initializer_range=0.2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def save_tiny_causal_lm(folder: Path, seed: int = 0) -> Path:
    model, tokenizer = tiny_causal_lm(seed)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
