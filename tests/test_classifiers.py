"""Digit classifiers (MMVAE protocol): shapes, learning, determinism, frozen save/load with weights_only."""

import collections
import pickle

import pytest
import torch

from meme_scale.classifiers import (
    DigitClassifier,
    classifier_counts,
    evaluate_classifier,
    load_classifier,
    save_classifier,
    train_classifier,
)

SHAPES = [(1, 28, 28), (3, 32, 32), (1, 8, 8)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks: one intra-op thread is faster and steady on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_set(shape, n, seed, num_classes=10, noise=0.3):
    """``num_classes`` fixed random binary prototypes (seed 1234) plus Gaussian pixel noise, clamped to [0, 1]."""
    protos = (torch.rand(num_classes, *shape, generator=torch.Generator().manual_seed(1234)) > 0.5).float()
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (n,), generator=g)
    images = (protos[labels] + noise * torch.randn(n, *shape, generator=g)).clamp(0, 1)
    return images, labels


def _pools(model):
    return sum(isinstance(m, torch.nn.MaxPool2d) for m in model.features)


def test_architecture_adapts_to_shape():
    assert _pools(DigitClassifier((1, 28, 28), 10)) == 2  # 28 -> 14 -> 7
    assert _pools(DigitClassifier((3, 32, 32), 10)) == 3  # 32 -> 16 -> 8 -> 4
    assert _pools(DigitClassifier((1, 8, 8), 10)) == 1  # 8 -> 4
    tiny = DigitClassifier((1, 4, 4), 3)  # below 8: one conv, no pooling
    assert _pools(tiny) == 0 and tiny(torch.rand(2, 1, 4, 4)).shape == (2, 3)
    assert DigitClassifier((1, 12, 20), 10)(torch.rand(2, 1, 12, 20)).shape == (2, 10)  # non-square
    with pytest.raises(ValueError, match="image shape"):
        DigitClassifier((784,), 10)
    with pytest.raises(ValueError, match="got a batch of shape"):
        DigitClassifier((1, 28, 28), 10)(torch.rand(2, 1, 32, 32))


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_learns_separable_toy_set(shape):
    x, y = toy_set(shape, 500, seed=0)
    x_test, y_test = toy_set(shape, 500, seed=1)
    model, train_acc = train_classifier(x, y, 10, epochs=3, batch_size=32, seed=0)
    assert train_acc > 0.9
    assert evaluate_classifier(model, x_test, y_test) > 0.9
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_learns_real_8x8_digits():
    """The quickstart's t modality (UCI digits): the small-image variant reaches the protocol's accuracy."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    model, _ = train_classifier(x[train], y[train], 10, epochs=10, batch_size=64, seed=0)
    assert evaluate_classifier(model, x[test], y[test]) > 0.9


def test_uint8_input_and_unlabelled_samples():
    x, y = toy_set((1, 8, 8), 64, seed=2)
    model = DigitClassifier((1, 8, 8), 10).eval()
    as_uint8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(model(as_uint8), model(as_uint8.float() / 255))
    y = y.clone()
    y[:10] = -1
    correct, total = classifier_counts(model, x, y).tolist()
    assert total == 54 and 0 <= correct <= 54


def test_training_is_seeded_and_leaves_global_rng_alone():
    x, y = toy_set((1, 8, 8), 128, seed=3)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    a, acc_a = train_classifier(x, y, 10, epochs=2, seed=5)
    after = torch.rand(3)
    b, acc_b = train_classifier(x, y, 10, epochs=2, seed=5)
    torch.testing.assert_close(before, after)
    assert acc_a == acc_b
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, msg=k)


def test_training_rejects_bad_labels():
    x, _ = toy_set((1, 8, 8), 8, seed=0)
    with pytest.raises(ValueError, match="labels must lie"):
        train_classifier(x, torch.full((8,), 10), 10, epochs=1)
    with pytest.raises(ValueError, match="as many labels"):
        train_classifier(x, torch.zeros(7, dtype=torch.long), 10, epochs=1)


def test_save_load_round_trip(tmp_path, monkeypatch):
    x, y = toy_set((3, 32, 32), 200, seed=4)
    model, _ = train_classifier(x, y, 10, epochs=1, seed=0)
    path = save_classifier(model, tmp_path / "clf" / "svhn.pt", test_accuracy=0.875)
    assert sorted(torch.load(path, weights_only=True)) == ["num_classes", "shape", "state_dict", "test_accuracy"]

    calls = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))
    loaded = load_classifier(path)
    assert calls and all(kw.get("weights_only") is True for kw in calls)

    assert loaded.shape == (3, 32, 32) and loaded.num_classes == 10 and loaded.test_accuracy == 0.875
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(loaded(x[:16]), model(x[:16]))
    assert evaluate_classifier(loaded, x, y) == evaluate_classifier(model, x, y)


def test_load_refuses_pickled_code_and_foreign_files(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save(
        {"state_dict": {}, "shape": [1, 8, 8], "num_classes": 10, "test_accuracy": collections.OrderedDict(x=object())},
        evil,
    )
    with pytest.raises(pickle.UnpicklingError):
        load_classifier(evil)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(ValueError, match="missing"):
        load_classifier(other)
    wrong = tmp_path / "wrong.pt"
    save_classifier(DigitClassifier((1, 8, 8), 10), wrong, None)
    payload = torch.load(wrong, weights_only=True)
    payload["shape"] = [1, 28, 28]
    torch.save(payload, wrong)
    with pytest.raises(ValueError, match="do not fit"):
        load_classifier(wrong)
    with pytest.raises(FileNotFoundError):
        load_classifier(tmp_path / "absent.pt")
