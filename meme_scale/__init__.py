"""meme_scale: a distributed trainer for multimodal VAEs learned through mutual supervision (MEME)."""

__version__ = "0.1.0"
