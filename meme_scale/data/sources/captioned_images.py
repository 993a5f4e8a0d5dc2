"""``make_shards.py custom --images DIR --captions FILE``: an image folder plus a captions file.

FILE has one ``<image path relative to DIR><TAB><caption>`` per line (an image may have several
lines; ``#`` lines are comments). Modalities ``image`` (RGB resized to ``--image-size``) and
``caption``. If every image sits in a sub-folder, the first folder name is its class label. The
split is by image, so an image's captions stay together.

Incomplete data is kept, not dropped: an image of DIR that no line names becomes an image-only
sample; a line whose path is empty, or names only a folder (``cats/<TAB>a cat``, which keeps the
class label), is a caption-only sample. A path naming a file that does not exist stays an error
(or a counted skip with ``--skip-bad``): a typo must not silently turn pairs into captions.
"""
from __future__ import annotations

import os

import numpy as np

from .. import tokenizer as tok
from ..writer import ShardWriter, check_output
from .common import BadInput, Skips, load_image, split_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def read_caption_file(path: str, images: str, skips: Skips) -> list[tuple[str, str, int]]:
    """[(relative image path, caption, line number)] from '<path>\\t<caption>' lines; errors name
    file and line. The path is "" or ends with "/" for a caption without an image."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--captions {path}: file not found")
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        rel, sep, caption = line.rstrip("\n").partition("\t")
        if not sep:
            raise ValueError(f"{path}, line {n}: expected '<image path>\\t<caption>', got {line.rstrip()!r}")
        if not tok.normalise(caption):
            skips.bad("empty caption", f"{path}, line {n}: empty caption for {rel}")
            continue
        rows.append((rel.strip(), caption, n))
    if not rows:
        raise ValueError(f"{path} holds no captions")
    return rows


def image_files(folder: str) -> list[str]:
    """Relative paths ('/'-separated) of the image files under ``folder``, sorted."""
    out = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                out.append(os.path.relpath(os.path.join(parent, name), folder).replace(os.sep, "/"))
    return sorted(out)


def _caption_only(rel: str) -> bool:
    return rel == "" or rel.endswith("/")


def build_from_images(out: str, images: str, captions: str, *, name: str, test_fraction: float = 0.1,
                      image_size: int = 64, vocab_size: int = tok.DEFAULT_VOCAB, caption_length: int = tok.LENGTH,
                      shard_size: int = 1000, seed: int = 0, skip_bad: bool = False,
                      overwrite: bool = False) -> tuple[dict, Skips]:
    """Convert an image folder plus a captions file; returns (meta.json content, skip counts)."""
    check_output(out, overwrite)
    if not os.path.isdir(images):
        raise FileNotFoundError(f"--images {images}: folder not found")
    skips = Skips(skip_bad)
    rows = read_caption_file(captions, images, skips)
    listed = sorted({rel for rel, _, _ in rows if not _caption_only(rel)})
    loaded: dict[str, np.ndarray] = {}
    for rel in sorted(set(listed) | set(image_files(images))):
        try:
            loaded[rel] = load_image(os.path.join(images, rel), image_size)
        except BadInput as e:
            skips.bad("image", str(e))
        except FileNotFoundError as e:
            if not skip_bad:
                raise FileNotFoundError(f"{e} (listed in {captions}); a caption without an image has an empty "
                                        "path or names only its folder, e.g. 'cats/'") from None
            skips.bad("missing image", str(e))
    # Items are what the split keeps together: an image with all its lines, or one caption-only line.
    items = sorted(loaded) + [f"line {n}" for rel, _, n in rows if _caption_only(rel)]
    if len(items) < 2:
        raise ValueError(f"{captions}: fewer than 2 usable images or captions, cannot make train and test splits")
    folder_of = {p: p.split("/")[0] if "/" in p else "" for p in loaded}
    folder_of.update({f"line {n}": rel.rstrip("/").split("/")[0] for rel, _, n in rows if _caption_only(rel)})
    by_folder = all(folder_of.values())
    label_names = sorted(set(folder_of.values())) if by_folder else None
    tr, te = split_indices(len(items), test_fraction, np.random.default_rng([seed, 0]))
    split_of = {items[i]: s for s, idx in (("train", tr), ("test", te)) for i in idx}
    captioned = {rel for rel, _, _ in rows}
    per_split: dict[str, list[tuple[str, str | None]]] = {}
    for s in ("train", "test"):
        lines = [(rel if not _caption_only(rel) else f"line {n}", c) for rel, c, n in rows]
        per_split[s] = [(item, c) for item, c in lines if split_of.get(item) == s]
        per_split[s] += [(p, None) for p in sorted(loaded) if p not in captioned and split_of[p] == s]
    if not any(item in loaded and c is not None for item, c in per_split["test"]):
        raise ValueError(f"{captions}: the test split has no image with a caption; evaluation needs complete "
                         "pairs (raise --test-fraction or caption more images)")
    tokenizer = tok.train([c for _, c in per_split["train"] if c is not None], vocab_size)
    modalities = {"image": {"kind": "image", "shape": [3, image_size, image_size]},
                  "caption": {"kind": "caption", "shape": [caption_length], "tokenizer": tokenizer}}
    source = {"kind": "custom", "from": "images", "images": os.path.abspath(images),
              "captions": os.path.abspath(captions), "split": f"by image, seeded, test_fraction={test_fraction}",
              "labels": "first folder" if by_folder else None, "image": f"RGB resized to {image_size}x{image_size}",
              "seed": seed, "images_per_split": {s: sum(1 for i in idx if items[i] in loaded) for s, idx in
                                                 (("train", tr), ("test", te))}}
    label_of = {n: i for i, n in enumerate(label_names or [])}
    writer = ShardWriter(out, name, modalities, label_names, samples_per_shard=shard_size, source=source,
                         overwrite=overwrite)
    with writer:
        for k, s in enumerate(("train", "test")):
            pairs = per_split[s]
            order = np.random.default_rng([seed, 1, k]).permutation(len(pairs))
            writer.write_split(s, ({"image": loaded.get(pairs[o][0]), "caption": pairs[o][1],
                                    "label": label_of[folder_of[pairs[o][0]]] if by_folder else None}
                                   for o in order))
        writer.source["skipped"] = skips.record()
    return writer.meta(), skips
