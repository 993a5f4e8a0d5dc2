"""PNG grids people look at: data, reconstructions and cross-generations side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

CELL = 56  # every image is scaled (nearest) to this size so 8x8 and 32x32 modalities line up
LABEL_W = 110


def _to_cells(images: torch.Tensor) -> list[Image.Image]:
    """[N, C, H, W] in [0, 1] -> PIL images of CELL x CELL."""
    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).astype(np.uint8)
    cells = []
    for img in arr:
        mode_img = Image.fromarray(img[0], "L") if img.shape[0] == 1 else Image.fromarray(img.transpose(1, 2, 0), "RGB")
        cells.append(mode_img.convert("RGB").resize((CELL, CELL), Image.NEAREST))
    return cells


def save_grid(rows: list[tuple[str, torch.Tensor]], path: str | Path) -> Path:
    """One labelled row per (label, images) pair; all rows have the same number of images."""
    n = max(len(images) for _, images in rows)
    canvas = Image.new("RGB", (LABEL_W + n * (CELL + 2), len(rows) * (CELL + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = r * (CELL + 2)
        draw.text((4, y + CELL // 2 - 6), label, fill="black")
        for c, cell in enumerate(_to_cells(images)):
            canvas.paste(cell, (LABEL_W + c * (CELL + 2), y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
