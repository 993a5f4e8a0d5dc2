"""Caption tokenizer (DESIGN 1.4, 2): a sentencepiece model trained on the training captions.

A caption becomes exactly ``length`` (32) token ids: its pieces, then ``eos``, then ``pad`` up to
the length. A caption with more than ``length - 1`` pieces is cut to ``length - 1`` pieces (fewer if
the cut would split a byte-spelled character) and still ends in ``eos`` (never dropped; the
writer counts and records in meta.json how many were cut).

Ids are fixed for every model this module trains: ``pad = 0`` (so hidden or padded positions are
zeros and carry no likelihood), ``unk = 1``, ``eos = 2``, no ``bos``. ``byte_fallback`` is on, so
a character never seen in the training captions (a test caption's accent, say) is spelled in
bytes instead of becoming ``unk``: decode(encode(c)) == normalise(c) for every caption that fits.

Normalisation, applied before training and before every encode: Unicode NFKC, lower case, runs
of whitespace collapsed to one space, no leading or trailing space. sentencepiece's own
normaliser is switched off ("identity") so this function is the only definition of "normalised".

The model file is stored beside the shards (``<modality>.spm.model``) and meta.json records its
name with ``vocab_size``, ``pad_id``, ``eos_id``, ``unk_id``; the reader tokenises ``caption.txt``
with it. Instances pickle as the model's bytes, so DataLoader workers can receive them.
"""
from __future__ import annotations

import io
import os
import unicodedata
from collections.abc import Iterable, Sequence

import numpy as np

LENGTH = 32
PAD_ID, UNK_ID, EOS_ID = 0, 1, 2
DEFAULT_VOCAB = 1000


def normalise(text: str) -> str:
    """NFKC, lower case, single spaces, stripped: the form captions are trained on and decode to."""
    return " ".join(unicodedata.normalize("NFKC", str(text)).lower().split())


def _spm():
    import sentencepiece  # imported lazily: `import meme_scale.data` stays cheap

    return sentencepiece


class Tokenizer:
    """A trained sentencepiece model with the fixed-length encode/decode the shards use."""

    def __init__(self, proto: bytes, source: str = "<memory>"):
        self.proto, self.source = bytes(proto), source
        try:
            self.sp = _spm().SentencePieceProcessor(model_proto=self.proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with terse messages
            raise ValueError(f"{source}: not a sentencepiece model ({e})") from e
        ids = (self.sp.pad_id(), self.sp.unk_id(), self.sp.eos_id())
        if ids != (PAD_ID, UNK_ID, EOS_ID):
            raise ValueError(f"{source}: tokenizer ids (pad, unk, eos) = {ids}, expected {(PAD_ID, UNK_ID, EOS_ID)}; "
                             "train it with meme_scale.data.tokenizer.train")

    @classmethod
    def load(cls, path: str) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer model {path} not found (it is written beside the shards by "
                                    "tools/make_shards.py)")
        with open(path, "rb") as f:
            return cls(f.read(), source=path)

    def save(self, path: str) -> None:
        with open(path, "wb") as f:
            f.write(self.proto)

    def __getstate__(self) -> dict:
        return {"proto": self.proto, "source": self.source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["source"])

    # -- ids -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    pad_id, unk_id, eos_id = PAD_ID, UNK_ID, EOS_ID

    def info(self) -> dict:
        """The meta.json entries of a caption modality that describe this tokenizer."""
        return {"vocab_size": self.vocab_size, "pad_id": PAD_ID, "eos_id": EOS_ID, "unk_id": UNK_ID}

    # -- encode / decode -----------------------------------------------------------------------
    def pieces(self, text: str) -> list[int]:
        """Token ids of the normalised text, without eos or padding."""
        return list(self.sp.encode(normalise(text)))

    def encode(self, text: str, length: int = LENGTH) -> np.ndarray:
        """int64 [length]: pieces (cut to length-1), eos, pad."""
        return self.encode_counted(text, length)[0]

    def encode_counted(self, text: str, length: int = LENGTH) -> tuple[np.ndarray, bool]:
        """(ids as in ``encode``, whether the caption was truncated)."""
        ids = self.pieces(text)
        truncated = len(ids) > length - 1
        out = np.full(length, PAD_ID, dtype=np.int64)
        ids = self._cut(ids, length - 1) if truncated else ids
        out[: len(ids)] = ids
        out[len(ids)] = EOS_ID
        return out, truncated

    def _cut(self, ids: list[int], n: int) -> list[int]:
        """The first n ids, minus trailing byte pieces of a character the cut would split in two."""
        kept = ids[:n]
        tail = 0
        while tail < len(kept) and self.sp.is_byte(kept[-1 - tail]):
            tail += 1
        if tail:  # a byte-spelled run starts at a character boundary: keep its whole characters only
            raw = bytes(int(self.sp.id_to_piece(i)[3:5], 16) for i in kept[len(kept) - tail:])
            kept = kept[: len(kept) - tail + _complete_utf8(raw)]
        return kept

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of the ids up to the first eos; pads are skipped (generated captions may hold any id)."""
        kept = []
        for i in np.asarray(ids).reshape(-1).tolist():
            if i == EOS_ID:
                break
            if i != PAD_ID and 0 <= i < self.vocab_size:
                kept.append(int(i))
        return self.sp.decode(kept)

    def decode_batch(self, ids) -> list[str]:
        """[N, T] ids (numpy or torch) -> N strings."""
        arr = ids.detach().cpu().numpy() if hasattr(ids, "detach") else np.asarray(ids)
        return [self.decode(row) for row in arr]


def _complete_utf8(raw: bytes) -> int:
    """Length of the longest prefix of ``raw`` made of whole UTF-8 characters."""
    i = 0
    while i < len(raw):
        lead = raw[i]
        size = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
        if i + size > len(raw):
            break
        i += size
    return i


def train(captions: Iterable[str], vocab_size: int = DEFAULT_VOCAB, *, model_type: str = "bpe") -> Tokenizer:
    """Train on (normalised) captions; ``vocab_size`` is an upper bound (small corpora give fewer pieces)
    and at least ``min_vocab_size`` of the captions (a ValueError naming ``--vocab-size`` otherwise).

    BPE by default: on small caption sets (a custom dataset, test fixtures) sentencepiece's unigram
    model keeps few pieces and spells most words letter by letter (a 15-word fixture caption took
    34 unigram pieces but 15 BPE pieces at the same vocabulary bound), while BPE merges whole
    frequent words first. Deterministic for the same captions in the same order (one thread).
    """
    texts = [t for t in (normalise(c) for c in captions) if t]
    if not texts:
        raise ValueError("no non-empty captions to train the tokenizer on")
    _check_vocab_size(int(vocab_size), texts)
    buf = io.BytesIO()
    try:
        _spm().SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=int(vocab_size), hard_vocab_limit=False,
            model_type=model_type, byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
            pad_id=PAD_ID, unk_id=UNK_ID, eos_id=EOS_ID, bos_id=-1, num_threads=1, minloglevel=2,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=1 << 14)
    except RuntimeError as e:  # a size check of sentencepiece's that _check_vocab_size did not foresee
        if "vocab" not in str(e).lower():
            raise
        raise ValueError(f"--vocab-size (meta.json vocab_size) {vocab_size}: sentencepiece refused it ({e})") from None
    return Tokenizer(buf.getvalue(), source=f"<trained on {len(texts)} captions>")


def min_vocab_size(texts: Iterable[str]) -> int:
    """The smallest vocabulary sentencepiece accepts for these normalised texts: with byte fallback and
    character_coverage=1.0 it must hold the 256 byte pieces, pad/unk/eos and every distinct character
    (the space counts as one: it becomes the word-boundary piece)."""
    return 256 + 3 + len(set("".join(texts)))


def _check_vocab_size(vocab_size: int, texts: list[str]) -> None:
    """Refuse a too-small vocabulary up front: sentencepiece would fail with a terse RuntimeError."""
    need = min_vocab_size(texts)
    if vocab_size < need:
        raise ValueError(f"--vocab-size (meta.json vocab_size) {vocab_size} is too small for these captions: "
                         f"it must be at least {need} (256 byte pieces + pad, unk, eos + {need - 259} distinct "
                         "characters in the training captions)")
