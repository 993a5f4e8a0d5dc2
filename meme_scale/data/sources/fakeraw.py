"""Small raw inputs written in the exact original formats, for tests and ``tools/bench_data.py``.

SVHN, CUB-200-2011 and its captions cannot be obtained here, so the converters are exercised on
files that follow those formats byte for byte: MNIST idx files (struct-packed big-endian
headers, optionally gzipped), SVHN ``.mat`` files written by ``scipy.io.savemat`` (X [32,32,3,N]
uint8, y [N,1] with 10 for digit 0), a CUB-shaped tree (images.txt, image_class_labels.txt,
classes.txt, JPEGs under images/<class>/, captions under text/<class>/<stem>.txt, class lists)
and an arrays folder for ``custom``. Every image's pixels are a function of (class, index) so a
test can check pixels and classes after conversion; the writers return what they wrote.
"""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np
from PIL import Image

COLOURS = ["red", "blue", "green", "yellow", "black", "white", "brown", "grey", "orange", "purple"]
PARTS = ["crown", "wings", "belly", "beak", "tail", "breast", "throat", "nape"]


def write_idx(path: str, array: np.ndarray) -> None:
    """An idx file (uint8 data): magic 0x0000080N, N big-endian uint32 dims, then the bytes."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    payload = struct.pack(">BBBB", 0, 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    if path.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def digit_image(cls: int, index: int, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Deterministic uint8 image whose mean brightness encodes the class (and noise the index)."""
    rng = np.random.default_rng([seed, cls, index])
    base = 20 + 22 * cls
    return np.clip(base + rng.integers(-15, 16, size=shape), 0, 255).astype(np.uint8)


def mnist_files(folder: str, per_class: dict[str, int], gz: bool = True, seed: int = 0) -> dict[str, tuple]:
    """Write the four MNIST idx files; returns {split: (images [N,28,28], labels [N])}."""
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        labels = np.repeat(np.arange(10), per_class[split]).astype(np.uint8)
        labels = labels[np.random.default_rng([seed, 7, len(prefix)]).permutation(len(labels))]
        images = np.stack([digit_image(int(c), i, (28, 28), seed) for i, c in enumerate(labels)])
        ext = ".gz" if gz else ""
        write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), images)
        write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), labels)
        out[split] = (images, labels.astype(np.int64))
    return out


def svhn_files(folder: str, per_class: dict[str, int], seed: int = 0) -> dict[str, tuple]:
    """Write train_32x32.mat / test_32x32.mat; returns {split: (images [N,3,32,32], digit labels [N])}."""
    import scipy.io

    os.makedirs(folder, exist_ok=True)
    out = {}
    for split in ("train", "test"):
        digits = np.repeat(np.arange(10), per_class[split])
        digits = digits[np.random.default_rng([seed, 9, len(split)]).permutation(len(digits))]
        images = np.stack([digit_image(int(c), 1000 + i, (3, 32, 32), seed) for i, c in enumerate(digits)])
        y = np.where(digits == 0, 10, digits).astype(np.uint8)[:, None]  # SVHN: label 10 is digit 0
        scipy.io.savemat(os.path.join(folder, f"{split}_32x32.mat"), {"X": images.transpose(2, 3, 1, 0), "y": y})
        out[split] = (images, digits.astype(np.int64))
    return out


def caption_for(cls: int, image: int, k: int, long: bool = False) -> str:
    """A bird-like caption; its colour words depend on the class, so captions carry the class."""
    c1, c2 = COLOURS[cls % len(COLOURS)], COLOURS[(cls * 3 + 1) % len(COLOURS)]
    part = PARTS[(image + k) % len(PARTS)]
    text = f"This bird has a {c1} {part} and {c2} {PARTS[(k + 3) % len(PARTS)]}, with a short beak."
    if long:
        text += " " + " ".join(f"it also has {COLOURS[(cls + j) % len(COLOURS)]} spots on its {PARTS[j % len(PARTS)]}"
                               for j in range(8))
    return text


def cub_tree(root: str, n_train_classes: int = 4, n_test_classes: int = 2, images_per_class: int = 3,
             captions_per_image: int = 10, image_size: tuple[int, int] = (48, 36), seed: int = 0,
             long_every: int = 7) -> dict:
    """A CUB_200_2011-shaped folder; returns {"classes", "train", "test" (class folders), "images":
    [(id, class folder, rel path, label)], "captions": {rel path: [lines]}}.

    Every ``long_every``-th image gets one caption far longer than 32 tokens (truncation tests).
    Class lists are written as trainvalclasses.txt / testclasses.txt in the root.
    """
    n_classes = n_train_classes + n_test_classes
    classes = [f"{c + 1:03d}.Bird_{chr(65 + c)}" for c in range(n_classes)]
    images, captions = [], {}
    for c, folder in enumerate(classes):
        os.makedirs(os.path.join(root, "images", folder), exist_ok=True)
        os.makedirs(os.path.join(root, "text", folder), exist_ok=True)
        for i in range(images_per_class):
            img_id = len(images) + 1
            stem = f"Bird_{chr(65 + c)}_{i:04d}_{img_id}"
            rel = f"{folder}/{stem}.jpg"
            rng = np.random.default_rng([seed, c, i])
            colour = np.array([(40 * c) % 256, (90 + 30 * i) % 256, (200 - 25 * c) % 256], dtype=np.int64)
            pixels = np.clip(colour + rng.integers(-10, 11, size=(image_size[1], image_size[0], 3)), 0, 255)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(os.path.join(root, "images", rel), quality=95)
            lines = [caption_for(c, i, k, long=(k == 0 and img_id % long_every == 0)) for k in range(captions_per_image)]
            with open(os.path.join(root, "text", folder, f"{stem}.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(lines) + "\n")
            images.append((img_id, folder, rel, c))
            captions[rel] = lines
    with open(os.path.join(root, "images.txt"), "w") as f:
        f.writelines(f"{i} {rel}\n" for i, _, rel, _ in images)
    with open(os.path.join(root, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{i} {c + 1}\n" for i, _, _, c in images)
    with open(os.path.join(root, "classes.txt"), "w") as f:
        f.writelines(f"{c + 1} {name}\n" for c, name in enumerate(classes))
    order = np.random.default_rng([seed, 99]).permutation(n_classes)
    train = sorted(classes[k] for k in order[:n_train_classes])
    test = sorted(classes[k] for k in order[n_train_classes:])
    for fname, names in (("trainvalclasses.txt", train), ("testclasses.txt", test)):
        with open(os.path.join(root, fname), "w") as f:
            f.write("\n".join(names) + "\n")
    return {"classes": classes, "train": train, "test": test, "images": images, "captions": captions}


def arrays_folder(folder: str, n: int = 60, seed: int = 0, caption: bool = True) -> dict[str, np.ndarray]:
    """An arrays folder for ``custom``: ``pic.npy`` uint8 [N,28,28], ``vec.npy`` float32 [N,16] or
    ``text.txt`` captions, and ``label.npy``; returns what was written."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, size=n)
    pic = np.stack([digit_image(int(c), i, (28, 28), seed) for i, c in enumerate(labels)])
    out = {"pic": pic, "label": labels}
    np.save(os.path.join(folder, "pic.npy"), pic)
    np.save(os.path.join(folder, "label.npy"), labels)
    if caption:
        lines = [caption_for(int(c), i, i % 3) for i, c in enumerate(labels)]
        with open(os.path.join(folder, "text.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        out["text"] = np.array(lines)
    else:
        vec = (labels[:, None] + rng.normal(0, 0.1, size=(n, 16))).astype(np.float32)
        np.save(os.path.join(folder, "vec.npy"), vec)
        out["vec"] = vec
    return out
