"""prismrec: multimodal sequential recommendation enhanced by multimodal LLMs."""

__version__ = "0.1.0"
