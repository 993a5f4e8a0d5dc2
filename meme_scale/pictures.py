"""PNG grids people look at: data, reconstructions and cross-generations side by side.

A row is ``(label, images)`` with images ``[N, C, H, W]`` in [0, 1], or ``(label, texts)`` with a
list of N strings: captions, decoded back from token ids with the dataset's tokenizer
(``caption_texts``). With any text row every column widens so a caption wraps into its cell.
"""

from __future__ import annotations

import functools
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CELL = 56  # every image is scaled (nearest) to this size so 8x8 and 32x32 modalities line up
LABEL_W = 110
TEXT_W = 168  # column width when captions are shown: ~27 characters of PIL's default font per line
LINE_H = 11
MAX_LINES = 8


def _to_cells(images: torch.Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [0, 1] -> PIL images of CELL x CELL."""
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    cells = []
    for img in arr:
        mode_img = Image.fromarray(img[0], "L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB")
        cells.append(mode_img.convert("RGB").resize((CELL, CELL), Image.NEAREST))
    return cells


def _wrap(text: str, width: int) -> list[str]:
    lines = textwrap.wrap(text, width=max(8, (width - 4) // 6), break_long_words=True) or ["<empty>"]
    if len(lines) > MAX_LINES:
        lines = lines[: MAX_LINES - 1] + [lines[MAX_LINES - 1][:-3] + "..."]
    return lines


def save_grid(rows: list[tuple[str, torch.Tensor | list[str]]], path: str | Path) -> Path:
    """One labelled row per (label, images or texts) pair; all rows have the same number of cells."""
    has_text = any(isinstance(cells, (list, tuple)) for _, cells in rows)
    col_w = TEXT_W if has_text else CELL
    wrapped = [[_wrap(t, col_w) for t in cells] if isinstance(cells, (list, tuple)) else None for _, cells in rows]
    heights = [CELL if w is None else max(CELL, 4 + LINE_H * max((len(x) for x in w), default=1)) for w in wrapped]
    n = max(len(cells) for _, cells in rows)
    canvas = Image.new("RGB", (LABEL_W + n * (col_w + 2), sum(h + 2 for h in heights)), "white")
    draw = ImageDraw.Draw(canvas)
    y = 0
    for (label, cells), lines, h in zip(rows, wrapped, heights):
        draw.text((4, y + h // 2 - 6), label, fill="black")
        if lines is None:
            for c, cell in enumerate(_to_cells(cells)):
                canvas.paste(cell, (LABEL_W + c * (col_w + 2) + (col_w - CELL) // 2, y))
        else:
            for c, text_lines in enumerate(lines):
                x = LABEL_W + c * (col_w + 2)
                draw.rectangle((x, y, x + col_w - 1, y + h - 1), fill=(245, 245, 245))
                draw.multiline_text((x + 2, y + 2), "\n".join(text_lines), fill="black", spacing=1)
        y += h + 2
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


@functools.lru_cache(maxsize=8)
def _tokenizer(path: str):
    from .data.tokenizer import Tokenizer

    return Tokenizer.load(path)


def caption_texts(tokenizers: dict[str, str] | None) -> dict[str, Callable[[torch.Tensor], list[str]]]:
    """{caption modality: token ids [N, T] -> N strings}, from a batch's "tokenizers" entry
    ({modality: path of its sentencepiece model}, set by ``eval_batches``); text stops at eos."""
    return {name: _tokenizer(str(path)).decode_batch for name, path in (tokenizers or {}).items()}
