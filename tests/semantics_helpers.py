"""Shared helpers for the semantics tests: a tiny MovieLens-format dataset with real posters."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from rich.console import Console

    from prismrec.semantics import Deriver, DeriveReport, SemanticCache

# Retries fast enough for tests against the local fake OpenAI server.
FAST_RETRY = {"backoff_base_s": 0.01, "backoff_max_s": 0.05, "timeout_s": 5.0}

SHARED_POSTERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "movielens-small" / "posters"

MOVIES = [
    (1, "Toy Story (1995)", "Adventure|Animation|Children|Comedy|Fantasy",
     "Led by Woody, Andy's toys live happily in his room until Andy's birthday brings Buzz Lightyear."),
    (2, "Jumanji (1995)", "Adventure|Children|Fantasy",
     "When siblings Judy and Peter discover an enchanted board game, they open the door to a magical world."),
    (3, "Grumpier Old Men (1995)", "Comedy|Romance",
     "A family wedding reignites the ancient feud between next-door neighbors and fishing buddies."),
    (5, "Father of the Bride Part II (1995)", "Comedy",
     "Just when George Banks has recovered from his daughter's wedding, he receives the news that she's pregnant."),
    (6, "Heat (1995)", "Action|Crime|Thriller",
     "Obsessive master thief Neil McCauley leads a top-notch crew on various daring heists."),
    (7, "Sabrina (1995)", "Comedy|Romance",
     "An ugly duckling having undergone a remarkable change still harbors feelings for her crush."),
    (8, "Tom and Huck (1995)", "Adventure|Children",
     "A mischievous young boy, Tom Sawyer, witnesses a murder by the deadly Injun Joe."),
    (9, "Sudden Death (1995)", "Action",
     "International action superstar Jean Claude Van Damme teams with Powers Boothe."),
    (10, "GoldenEye (1995)", "Action|Adventure|Thriller",
     "James Bond must unmask the mysterious head of the Janus Syndicate and prevent a satellite attack."),
    (11, "American President, The (1995)", "Comedy|Drama|Romance",
     "Widowed U.S. president Andrew Shepherd falls for a lobbyist."),
    (12, "Dracula: Dead and Loving It (1995)", "Comedy|Horror", None),
    (13, "Balto (1995)", "Adventure|Animation|Children",
     "An outcast half-wolf risks his life to prevent a deadly epidemic."),
]
WITHOUT_POSTER = {12, 13}


def make_tiny_movielens(data_dir: Path, n_users: int = 4) -> Path:
    """``data_dir/movielens-small`` with 12 movies (10 with real posters), ratings and overviews."""
    root = data_dir / "movielens-small"
    (root / "posters").mkdir(parents=True, exist_ok=True)
    with open(root / "movies.csv", "w") as handle:
        handle.write("movieId,title,genres\n")
        for movie, title, genres, _ in MOVIES:
            quoted = f'"{title}"' if "," in title else title
            handle.write(f"{movie},{quoted},{genres}\n")
    with open(root / "overviews.csv", "w") as handle:
        handle.write("movieId,overview\n")
        for movie, _, _, overview in MOVIES:
            if overview:
                handle.write(f'{movie},"{overview}"\n')
    with open(root / "ratings.csv", "w") as handle:
        handle.write("userId,movieId,rating,timestamp\n")
        timestamp = 1_000_000
        for user in range(1, n_users + 1):
            for movie, *_ in MOVIES:
                timestamp += 1
                handle.write(f"{user},{movie},4.0,{timestamp}\n")
    for movie, *_ in MOVIES:
        if movie in WITHOUT_POSTER:
            continue
        target = root / "posters" / f"{movie}.jpg"
        if (SHARED_POSTERS / f"{movie}.jpg").exists():
            shutil.copyfile(SHARED_POSTERS / f"{movie}.jpg", target)
        else:  # without the shared bundle: a generated poster of the bundle's typical size
            from PIL import Image

            rng = np.random.default_rng(movie)
            pixels = rng.integers(0, 256, size=(188 + 4 * (movie % 2), 128, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(target, quality=80)
    return root


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]


def make_tiny_qwen2_5_vl(folder: Path) -> Path:
    """A randomly initialised, tiny Qwen2.5-VL saved as a local model folder (no download).

    A byte-level BPE tokenizer with Qwen's special tokens and a Qwen-style chat template, the PIL
    Qwen2-VL image processor and a 2-layer text / 2-block vision model. Its generation config lists most
    of the vocabulary as end-of-sequence tokens, so greedy answers stop after a few tokens
    (``min_tokens`` forces the first ones) instead of running to ``max_tokens``.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([m[1] + " " + (m[3] or "") for m in MOVIES], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(folder)
    ids = {token: fast.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    vocab = tokenizer.get_vocab_size()
    config = Qwen2_5_VLConfig(
        text_config={"vocab_size": vocab, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
                     "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"],
                     "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}},
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56,
                       "fullatt_block_indexes": [1]},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(0)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], *range(40, vocab)]
    model.save_pretrained(folder)
    Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 64}).save_pretrained(folder)
    return folder


async def run_deriver(deriver: Deriver) -> DeriveReport:
    """Run a derivation and close its backend's and embedder's connections."""
    try:
        return await deriver.run()
    finally:
        await deriver.backend.aclose()
        await deriver.embedder.aclose()


def openai_deriver(cache: SemanticCache, data_dir: Path, urls: list[str], *, console: Console | None = None,
                   concurrency: int = 4, max_retries: int = 3, timeout_s: float = 5.0, chat: dict | None = None,
                   **options: object) -> Deriver:
    """A MovieLens derivation with the openai backend and embedder against ``urls`` (``chat``: more backend
    options, e.g. ``image_input``)."""
    from prismrec.semantics import DeriveOptions, Deriver
    from prismrec.semantics.backends.openai import OpenAIBackend, OpenAIChatOptions
    from prismrec.semantics.embedders.openai import OpenAIEmbedder, OpenAIEmbeddingOptions

    retry = {**FAST_RETRY, "timeout_s": timeout_s}
    backend = OpenAIBackend(OpenAIChatOptions(base_urls=urls, model="fake-vl", concurrency=concurrency,
                                              max_retries=max_retries, **retry, **(chat or {})), cache)
    embedder = OpenAIEmbedder(OpenAIEmbeddingOptions(base_urls=urls, batch_size=5, **FAST_RETRY))
    return Deriver(DeriveOptions(dataset="movielens-small", data_dir=data_dir, **options), backend, embedder, cache,
                   console=console)
