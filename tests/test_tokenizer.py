"""Caption tokenizer: round trip, fixed length with eos and pad, truncation, unseen characters, files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from meme_scale.data import tokenizer as tok
from meme_scale.data.sources.fakeraw import caption_for

CAPTIONS = [caption_for(c, i, k) for c in range(6) for i in range(3) for k in range(10)] + [
    "A tiny  bird,\twith ORANGE feathers and a curved   bill.",
    "this is a large grey bird with long legs",
]


@pytest.fixture(scope="module")
def tk() -> tok.Tokenizer:
    return tok.train(CAPTIONS, vocab_size=400)


def test_ids_and_vocab(tk: tok.Tokenizer) -> None:
    assert (tk.pad_id, tk.unk_id, tk.eos_id) == (0, 1, 2)
    assert tk.info() == {"vocab_size": tk.vocab_size, "pad_id": 0, "eos_id": 2, "unk_id": 1}
    assert 256 < tk.vocab_size <= 400  # byte fallback (256) + pieces, bounded by the request
    assert tk.sp.piece_to_id("▁bird") not in (0, 1)  # frequent words become whole pieces


@pytest.mark.parametrize("text", CAPTIONS[::7] + ["Ünïcode façade ½", "unseen wørds like qxzj, ok?"])
def test_round_trip_equals_normalised_caption(tk: tok.Tokenizer, text: str) -> None:
    ids = tk.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (tok.LENGTH,)
    assert tk.decode(ids) == tok.normalise(text)
    n = len(tk.pieces(text))
    assert ids[n] == tk.eos_id and (ids[n + 1 :] == tk.pad_id).all() and (ids[:n] > tk.eos_id).all()


def test_normalise() -> None:
    assert tok.normalise("  A Bird\n\twith  RED ﬁns ") == "a bird with red fins"  # NFKC folds the ligature
    assert tok.normalise(" \n ") == ""


def test_long_caption_is_truncated_with_eos_never_dropped(tk: tok.Tokenizer) -> None:
    long = " ".join(CAPTIONS[:6])
    pieces = tk.pieces(long)
    assert len(pieces) > tok.LENGTH
    ids, cut = tk.encode_counted(long)
    assert cut and ids.shape == (32,) and ids[-1] == tk.eos_id and (ids != tk.pad_id).all()
    assert ids[:31].tolist() == pieces[:31]
    assert long.lower().startswith(tk.decode(ids)[:40])
    exact = tk.encode_counted(CAPTIONS[0], length=len(tk.pieces(CAPTIONS[0])) + 1)
    assert not exact[1] and exact[0][-1] == tk.eos_id  # pieces + eos fill the length exactly: not cut


def test_truncation_never_splits_a_character_spelled_in_bytes(tk: tok.Tokenizer) -> None:
    for pad in range(6):  # shift where the cut falls relative to the multi-byte characters
        text = "a " * (12 + pad) + "ĀāĂăĄą ŴŵŶŷ"
        ids, cut = tk.encode_counted(text)
        assert cut and ids[ids != tk.pad_id][-1] == tk.eos_id
        decoded = tk.decode(ids)
        assert "\ufffd" not in decoded and tok.normalise(text).startswith(decoded)


def test_decode_stops_at_eos_and_skips_pad(tk: tok.Tokenizer) -> None:
    ids = tk.encode("a red bird")
    noisy = ids.copy()
    noisy[len(tk.pieces("a red bird")) + 1 :] = 7  # generated ids after eos are ignored
    assert tk.decode(noisy) == "a red bird"
    assert tk.decode([0, 0, *tk.pieces("a red bird"), 0]) == "a red bird"
    assert tk.decode_batch(np.stack([ids, ids])) == ["a red bird"] * 2


def test_save_load_pickle_and_determinism(tk: tok.Tokenizer, tmp_path) -> None:
    path = str(tmp_path / "c.spm.model")
    tk.save(path)
    loaded = tok.Tokenizer.load(path)
    assert loaded.proto == tk.proto and (loaded.encode(CAPTIONS[3]) == tk.encode(CAPTIONS[3])).all()
    clone = pickle.loads(pickle.dumps(tk))  # DataLoader workers receive tokenizers this way
    assert (clone.encode(CAPTIONS[5]) == tk.encode(CAPTIONS[5])).all()
    assert tok.train(CAPTIONS, vocab_size=400).proto == tk.proto


def test_errors_name_the_problem(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nothere.model"):
        tok.Tokenizer.load(str(tmp_path / "nothere.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="bad.model: not a sentencepiece model"):
        tok.Tokenizer.load(str(bad))
    with pytest.raises(ValueError, match="no non-empty captions"):
        tok.train(["", "  "])
    with pytest.raises(ValueError, match="vocab_size"):
        tok.train(CAPTIONS, vocab_size=10)


def test_too_small_vocab_size_names_the_option_and_its_minimum() -> None:
    # byte fallback needs 256 byte pieces + pad/unk/eos + every distinct character: below that
    # sentencepiece dies with a bare RuntimeError, which make_shards.py would print as a traceback
    need = tok.min_vocab_size(tok.normalise(c) for c in CAPTIONS)
    assert need == 259 + len(set("".join(tok.normalise(c) for c in CAPTIONS)))
    with pytest.raises(
        ValueError,
        match=rf"--vocab-size \(meta.json vocab_size\) {need - 1} is too small.* "
        rf"at least {need} ",
    ):
        tok.train(CAPTIONS, vocab_size=need - 1)
    assert tok.train(CAPTIONS, vocab_size=need).vocab_size <= need  # the minimum itself is accepted
