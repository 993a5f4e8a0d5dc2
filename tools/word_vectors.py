"""Word vectors for the CCA coherence of image-caption data, made from the training captions.

    python tools/word_vectors.py --shards data/cub [--out FILE] [--dim 100] [--window 5]

Positive PMI of window co-occurrences and a truncated SVD over the training split's captions (the
paper's authors trained their word vectors on the CUB captions too); written in the fastText text
format to ``<shards>/word_vectors.txt``, where evaluation finds them (``eval.cca_word_vectors``
names any other file, e.g. downloaded fastText vectors). Prints a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meme_scale.cca_features import save_word_vectors, train_word_vectors  # noqa: E402
from meme_scale.data.shards import eval_batches, load_tokenizer, read_meta  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", required=True, help="a shard folder written by tools/make_shards.py")
    parser.add_argument("--modality", default=None, help="the caption modality (default: the only one)")
    parser.add_argument("--out", default=None, help="the vectors file (default: <shards>/word_vectors.txt)")
    parser.add_argument("--dim", type=int, default=100)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--min-count", type=int, default=1)
    args = parser.parse_args(argv)

    meta = read_meta(args.shards)
    captions = [m for m, spec in meta["modalities"].items() if spec["kind"] == "caption"]
    if args.modality is None and len(captions) != 1:
        print(
            f"error: {args.shards}/meta.json has caption modalities {captions}: name one with --modality",
            file=sys.stderr,
        )
        return 2
    modality = args.modality or captions[0]
    if modality not in captions:
        print(f"error: {modality!r} is no caption modality of {args.shards} (those are {captions})", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(args.shards, meta, modality)
    texts = [
        text
        for batch in eval_batches(args.shards, "train", 1024, modalities=[modality], rank=0, world_size=1)
        for text in tokenizer.decode_batch(batch[modality])
    ]
    try:
        vectors = train_word_vectors(texts, dim=args.dim, window=args.window, min_count=args.min_count)
    except ValueError as e:
        print(f"error: {args.shards}: {e}", file=sys.stderr)
        return 2
    path = save_word_vectors(vectors, args.out or Path(args.shards) / "word_vectors.txt")
    print(
        json.dumps(
            {
                "file": str(path),
                "captions": len(texts),
                "words": len(vectors.index),
                "dim": vectors.dim,
                "seconds": round(time.perf_counter() - t0, 1),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
