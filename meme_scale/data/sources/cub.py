"""CUB-200-2011 image-caption pairs (MEME/MMVAE "CUB"), from files the user already has.

Inputs under ``--root`` (the CUB_200_2011 folder; nothing is downloaded):

- ``images.txt`` (``<image id> <class folder>/<file>.jpg``), ``image_class_labels.txt``
  (``<image id> <class id>``), optional ``classes.txt`` (``<class id> <class folder>``) and the
  JPEGs under ``images/``;
- captions (Reed et al. 2016, ``cvpr2016_cub``): ``--text`` (default ``ROOT/text``, else
  ``ROOT/text_c10``) holding ``<class folder>/<file stem>.txt`` with one caption per line
  (10 per image);
- the class split: ``--train-classes`` (default ``ROOT/trainvalclasses.txt``, the 150 train+val
  classes) and ``--test-classes`` (default ``ROOT/testclasses.txt``, the 50 test classes), one class
  folder name per line, as shipped with the caption data. Images of classes in neither list are
  left out (counted in meta.json).

Output: one sample per (image, caption): every image appears once with each of its captions.
Modalities: ``image`` (uint8 RGB [3, S, S], the photo resized to ``--image-size``, default 64:
the conv nets' input) and ``caption`` (text, tokenised by the reader to 32 ids with the
sentencepiece model this converter trains on the *training* captions only). With
``--features resnet101 --weights FILE`` the image modality is instead ``feat``: the 2048-d
pooled features of a torchvision ResNet-101 loaded from that local weights file (the paper's CUB
image modality; needs the ``torchvision`` package). Labels are the 200 CUB classes.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

import numpy as np

from .. import tokenizer as tok
from ..writer import ShardWriter, check_output
from .common import BadInput, Skips, add_common_arguments, load_image, require_files

HELP = "CUB-200-2011 images + 10 captions per image (class split from your trainval/test class lists)"
NAME = "cub"
FEATURE_DIM = 2048
FEATURE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``make_shards.py cub``."""
    parser.add_argument("--root", required=True, help="CUB_200_2011 folder (images.txt, image_class_labels.txt, images/)")
    parser.add_argument("--text", help="caption folder <class>/<image>.txt (default ROOT/text, else ROOT/text_c10)")
    parser.add_argument("--train-classes", help="train(+val) class list, one class folder per line "
                                                "(default ROOT/trainvalclasses.txt)")
    parser.add_argument("--test-classes", help="test class list (default ROOT/testclasses.txt)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the stored square RGB images (default 64)")
    parser.add_argument("--vocab-size", type=int, default=tok.DEFAULT_VOCAB,
                        help=f"sentencepiece vocabulary size, an upper bound (default {tok.DEFAULT_VOCAB})")
    parser.add_argument("--caption-length", type=int, default=tok.LENGTH, help="tokens per caption (default 32)")
    parser.add_argument("--features", choices=("none", "resnet101"), default="none",
                        help="resnet101: store 2048-d ResNet-101 features (modality 'feat') instead of pixels")
    parser.add_argument("--weights", help="local torchvision ResNet-101 state_dict file (required by --features)")
    parser.add_argument("--feature-batch", type=int, default=64, help="images per ResNet forward pass (default 64)")
    add_common_arguments(parser, shard_size=1000)


# -- reading the CUB metadata -----------------------------------------------------------------
def _read_table(path: str, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of ``columns`` fields (blank lines ignored); errors name file and line."""
    require_files([path], "CUB metadata")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            parts = line.split(None, columns - 1)
            if not parts:
                continue
            if len(parts) != columns:
                raise ValueError(f"{path}, line {n}: expected {columns} fields, got {line.rstrip()!r} "
                                 "(truncated file?)")
            rows.append(parts)
    if not rows:
        raise ValueError(f"{path} is empty")
    return rows


def _read_list(path: str, flag: str) -> list[str]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"class list {path} not found: pass {flag} FILE (one class folder name per line, "
                                "e.g. trainvalclasses.txt / testclasses.txt from the CUB caption data)")
    with open(path, encoding="utf-8") as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        raise ValueError(f"class list {path} ({flag}) is empty")
    return names


def read_catalogue(root: str) -> tuple[list[tuple[str, str, int]], list[str]]:
    """([(class folder, relative image path, label = class id - 1)] in images.txt order, class names)."""
    images_txt, labels_txt = os.path.join(root, "images.txt"), os.path.join(root, "image_class_labels.txt")
    require_files([images_txt, labels_txt], f"CUB metadata in {root}")
    images = {i: p.strip() for i, p in _read_table(images_txt, 2)}
    labels = {i: c.strip() for i, c in _read_table(labels_txt, 2)}
    if images.keys() != labels.keys():
        only_i, only_l = sorted(images.keys() - labels.keys()), sorted(labels.keys() - images.keys())
        raise ValueError(f"{images_txt} lists {len(images)} images but {labels_txt} labels {len(labels)}; "
                         f"ids only in images.txt: {only_i[:5]}, only in image_class_labels.txt: {only_l[:5]}")
    folders: dict[int, str] = {}
    entries = []
    for i, rel in images.items():
        folder = rel.split("/")[0] if "/" in rel else ""
        if not folder:
            raise ValueError(f"{images_txt}: image {i} path {rel!r} has no class folder")
        try:
            cid = int(labels[i])
        except ValueError:
            raise ValueError(f"{labels_txt}: image {i} has class id {labels[i]!r}, not an integer") from None
        if folders.setdefault(cid, folder) != folder:
            raise ValueError(f"{labels_txt}: class {cid} holds images of folders {folders[cid]!r} and {folder!r}")
        if cid < 1:
            raise ValueError(f"{labels_txt}: image {i} has class id {cid}; CUB class ids start at 1")
        entries.append((folder, rel, cid - 1))
    classes_txt = os.path.join(root, "classes.txt")
    if os.path.isfile(classes_txt):
        names = {int(c): n.strip() for c, n in _read_table(classes_txt, 2)}
    else:
        names = folders
    n_classes = max(names)
    return entries, [names.get(c, folders.get(c, f"class_{c}")) for c in range(1, n_classes + 1)]


def read_captions(path: str) -> list[str]:
    """Non-empty lines of a caption file; raises BadInput (empty) or FileNotFoundError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"caption file {path} not found")
    try:
        with open(path, encoding="utf-8") as f:
            caps = [tok.normalise(line) for line in f]
    except UnicodeDecodeError as e:
        raise BadInput(f"caption file {path} is not UTF-8 text: {e}") from None
    caps = [c for c in caps if c]
    if not caps:
        raise BadInput(f"caption file {path} is empty")
    return caps


# -- image features ---------------------------------------------------------------------------
def resnet101_features(weights: str, batch: int = 64):
    """A function uint8 [N,3,224,224] -> float32 [N,2048] (ResNet-101 without its classifier)."""
    try:
        import torchvision
    except ImportError as e:
        raise ImportError(f"--features resnet101 needs the torchvision package, which is not installed ({e}); "
                          "install the torchvision build that matches your torch, or use the default pixel "
                          "images (--features none)") from None
    import torch

    model = torchvision.models.resnet101(weights=None)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"--weights {weights}: cannot load a state_dict ({type(e).__name__}: {e})") from e
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--weights {weights}: not a torchvision ResNet-101 state_dict ({e})") from e
    model.fc = torch.nn.Identity()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.eval().to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @torch.no_grad()
    def features(images: np.ndarray) -> np.ndarray:
        out = []
        for k in range(0, len(images), batch):
            x = torch.from_numpy(images[k:k + batch]).to(device).float().div_(255.0)
            out.append(model((x - mean) / std).float().cpu().numpy())
        feats = np.concatenate(out)
        if feats.shape[1:] != (FEATURE_DIM,):
            raise ValueError(f"--weights {weights}: features have shape {list(feats.shape[1:])}, expected [{FEATURE_DIM}]")
        return feats

    return features


# -- conversion -------------------------------------------------------------------------------
def _guarded(skips: Skips, reason: str, fn, *args):
    """fn(*args), or None after a counted skip (--skip-bad) of an undecodable or missing per-image file."""
    try:
        return fn(*args)
    except BadInput as e:
        skips.bad(reason, str(e).split(" (pass --skip-bad")[0])
    except FileNotFoundError as e:
        if not skips.skip_bad:
            raise
        skips.bad(f"missing {reason}", str(e))
    return None


def _flush_features(d: dict, extract) -> None:
    if d["pending"]:
        d["images"].extend(extract(np.stack(d["pending"])))
        d["pending"].clear()


def _default(path: str | None, *candidates: str) -> str:
    if path:
        return path
    for c in candidates:
        if os.path.exists(c):
            return c
    return candidates[0]


def build(out: str, root: str, *, text: str | None = None, train_classes: str | None = None,
          test_classes: str | None = None, image_size: int = 64, vocab_size: int = tok.DEFAULT_VOCAB,
          caption_length: int = tok.LENGTH, features: str = "none", weights: str | None = None,
          feature_batch: int = 64, shard_size: int = 1000, seed: int = 0, skip_bad: bool = False,
          overwrite: bool = False) -> tuple[dict, Skips]:
    """Convert and write the CUB image-caption shards; returns (meta.json content, skip counts)."""
    if features == "resnet101" and not weights:
        raise ValueError("--features resnet101 needs --weights FILE: a local torchvision ResNet-101 state_dict "
                         "(nothing is downloaded)")
    if features == "resnet101" and not os.path.isfile(weights):
        raise FileNotFoundError(f"--weights {weights}: file not found")
    if image_size < 8:
        raise ValueError(f"--image-size must be >= 8, got {image_size}")
    check_output(out, overwrite)
    if not os.path.isdir(root):
        raise FileNotFoundError(f"--root {root}: folder not found")
    text = _default(text, os.path.join(root, "text"), os.path.join(root, "text_c10"))
    if not os.path.isdir(text):
        raise FileNotFoundError(f"caption folder {text} not found: pass --text DIR (<class>/<image>.txt files, "
                                "10 captions per image, from the CUB caption data)")
    lists = {"train": _read_list(_default(train_classes, os.path.join(root, "trainvalclasses.txt")), "--train-classes"),
             "test": _read_list(_default(test_classes, os.path.join(root, "testclasses.txt")), "--test-classes")}
    both = sorted(set(lists["train"]) & set(lists["test"]))
    if both:
        raise ValueError(f"classes in both the train and the test list: {both[:5]}")
    entries, class_names = read_catalogue(root)
    known = {folder for folder, _, _ in entries}
    for split, names in lists.items():
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"{split} class list names classes with no image in images.txt: {unknown[:5]}")
    extract = resnet101_features(weights, feature_batch) if features == "resnet101" else None

    skips = Skips(skip_bad)
    split_of = {c: s for s, names in lists.items() for c in names}
    per_split: dict[str, dict] = {s: {"images": [], "pending": [], "captions": [], "labels": []} for s in lists}
    caption_counts: dict[int, int] = {}
    left_out = 0
    size = FEATURE_SIZE if extract else image_size
    for folder, rel, label in entries:
        split = split_of.get(folder)
        if split is None:
            left_out += 1
            continue
        caps = _guarded(skips, "caption file", read_captions, os.path.join(text, os.path.splitext(rel)[0] + ".txt"))
        image = None if caps is None else _guarded(skips, "image", load_image, os.path.join(root, "images", rel), size)
        if image is None:
            continue
        caption_counts[len(caps)] = caption_counts.get(len(caps), 0) + 1
        d = per_split[split]
        d["pending" if extract is not None else "images"].append(image)
        d["captions"].append(caps)
        d["labels"].append(label)
        if extract is not None and len(d["pending"]) >= feature_batch:
            _flush_features(d, extract)  # 224x224 inputs never pile up: features as images arrive
    for split, d in per_split.items():
        if extract is not None:
            _flush_features(d, extract)
        if not d["images"]:
            raise ValueError(f"no usable {split} image: the {split} class list matches no image with captions")

    tokenizer = tok.train((c for caps in per_split["train"]["captions"] for c in caps), vocab_size)
    if extract is not None:
        image_mod, image_spec = "feat", {"kind": "vector", "shape": [FEATURE_DIM]}
    else:
        image_mod, image_spec = "image", {"kind": "image", "shape": [3, image_size, image_size]}
    modalities = {image_mod: image_spec,
                  "caption": {"kind": "caption", "shape": [caption_length], "tokenizer": tokenizer}}
    source = {
        "kind": NAME, "root": os.path.abspath(root), "text": os.path.abspath(text),
        "class_lists": {s: len(n) for s, n in lists.items()}, "classes_left_out_images": left_out,
        "images": {s: len(d["images"]) for s, d in per_split.items()},
        "captions_per_image": {str(k): v for k, v in sorted(caption_counts.items())},
        "image": (f"ResNet-101 pooled features (2048-d) of {FEATURE_SIZE}x{FEATURE_SIZE} ImageNet-normalised "
                  f"images, weights {os.path.abspath(weights)}" if extract else
                  f"RGB resized to {image_size}x{image_size} (bilinear, aspect ratio not kept)"),
        "pairing": "each image with each of its captions; samples shuffled (seeded)",
        "tokenizer": f"sentencepiece BPE trained on the {sum(map(len, per_split['train']['captions']))} "
                     f"training captions, vocab {tokenizer.vocab_size} (requested {vocab_size})",
        "seed": seed,
    }
    writer = ShardWriter(out, NAME, modalities, class_names, samples_per_shard=shard_size, source=source,
                         overwrite=overwrite)
    with writer:
        for k, split in enumerate(("train", "test")):
            d = per_split[split]
            # uint8 [3, S, S] pixels or float32 [2048] features, each written once per caption:
            # validate and encode it once (and let the raw arrays go)
            images = [writer.encoded(image_mod, x, f"{split} image {i}") for i, x in enumerate(d.pop("images"))]
            pairs = [(i, j) for i, caps in enumerate(d["captions"]) for j in range(len(caps))]
            order = np.random.default_rng([seed, k]).permutation(len(pairs))
            writer.write_split(split, _samples(image_mod, images, d["captions"], d["labels"], [pairs[o] for o in order]))
        writer.source["skipped"] = skips.record()
    return writer.meta(), skips


def _samples(image_mod: str, images: list, captions: list[list[str]], labels: list[int],
             pairs: list[tuple[int, int]]) -> Iterator[dict]:
    for i, j in pairs:
        yield {image_mod: images[i], "caption": captions[i][j], "label": labels[i]}


def run(args: argparse.Namespace) -> str:
    """CLI entry: convert and return the one-line summary."""
    meta, skips = build(args.out, args.root, text=args.text, train_classes=args.train_classes,
                        test_classes=args.test_classes, image_size=args.image_size, vocab_size=args.vocab_size,
                        caption_length=args.caption_length, features=args.features, weights=args.weights,
                        feature_batch=args.feature_batch, shard_size=args.shard_size, seed=args.seed,
                        skip_bad=args.skip_bad, overwrite=args.overwrite)
    s, cap = meta["splits"], meta["modalities"]["caption"]
    cut = sum(cap["truncated"].values())
    return (f"cub: {s['train']} train + {s['test']} test (image, caption) pairs, vocab {cap['vocab_size']}, "
            f"{cut} caption(s) truncated to {cap['shape'][0]} tokens{skips.summary()} -> {args.out}")
