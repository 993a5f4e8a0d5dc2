"""Config: every shipped file loads, overrides apply, bad input names the key and the file."""

import subprocess
import sys
from pathlib import Path

import pytest

from meme_scale.config import Config, ConfigError, deepspeed_config, describe_keys, flatten, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(ROOT.joinpath("configs").rglob("*.yaml"))
TRAINING_CONFIGS = [p for p in CONFIGS if "sweeps" not in p.parts]


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert len(cfg.model.modalities) in (0, 2)
    assert cfg.train.precision == "auto"  # every shipped config lets the hardware choose (meme_scale.hardware)
    for precision in ("fp32", "bf16"):  # either resolution starts: bf16 gets the ZeRO stage it needs
        ds = deepspeed_config(cfg, 2, precision)
        assert ds["train_batch_size"] == cfg.train.micro_batch_size * cfg.train.grad_accum * 2
        assert ds["zero_optimization"]["stage"] >= (precision == "bf16")


def test_shipped_configs_exist():
    names = {p.name for p in TRAINING_CONFIGS}
    assert {"quickstart.yaml", "mnist_svhn.yaml", "cub.yaml"} <= names


def test_overrides_apply_with_types():
    cfg = load_config(
        TRAINING_CONFIGS[0],
        [
            "train.max_steps=7",
            "train.seed=3",
            "run.dir=/tmp/x",
            "data.observed_fraction=0.25",
            "optim.betas=[0.5, 0.9]",
        ],
    )
    assert (cfg.train.max_steps, cfg.train.seed, cfg.run.dir) == (7, 3, "/tmp/x")
    assert cfg.data.observed_fraction == 0.25 and cfg.optim.betas == [0.5, 0.9]


def test_override_into_modality_list(tmp_path):
    cfg = load_config(Path("configs/quickstart.yaml"), ["model.modalities.1.net=mnist_mlp"])
    assert cfg.model.modalities[1].net == "mnist_mlp" and cfg.model.modalities[1].name == "digits"


@pytest.mark.parametrize(
    "text, override, message",
    [
        ("train: {max_stepz: 3}\n", None, r"bad\.yaml: unknown key 'train\.max_stepz'"),
        ("model: {modalities: [{name: a, nett: x}, {name: b}]}\n", None, r"unknown key 'model\.modalities\.0\.nett'"),
        ("train: {max_steps: ten}\n", None, r"bad\.yaml: key 'train\.max_steps' must be int"),
        ("train: {precision: fp8}\n", None, r"'train\.precision' must be one of"),
        ("train: {threads: -1}\n", None, r"bad\.yaml: key 'train\.threads' must be >= 0"),
        ("data: {observed_fraction: 1.5}\n", None, r"'data\.observed_fraction' must be in \(0, 1\]"),
        ("train: [1, 2]\n", None, r"key 'train' must be a mapping"),
        ("train: {max_steps: 3\n", None, r"bad\.yaml: not valid YAML"),
        ("{}\n", "train.bogus=1", r"unknown key 'train\.bogus'"),
        ("{}\n", "train.max_steps", r"override 'train\.max_steps' is not key=value"),
    ],
)
def test_bad_input_names_key_and_file(tmp_path, text, override, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override] if override else [])


def test_missing_file_is_named():
    with pytest.raises(ConfigError, match="not found: nowhere.yaml"):
        load_config("nowhere.yaml")


def test_deepspeed_json_follows_config():
    cfg = load_config(
        None,
        [
            "train.precision=bf16",
            "train.zero_stage=2",
            "optim.grad_clip=1.0",
            "train.grad_accum=4",
            "train.micro_batch_size=16",
        ],
    )
    ds = deepspeed_config(cfg, world_size=3)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 1.0 and ds["train_batch_size"] == 16 * 4 * 3
    assert "fp16" not in ds
    # always written: absent, DeepSpeed clips at 1.0 whatever the config says
    assert deepspeed_config(load_config(None, ["optim.grad_clip=0"]), 1, "fp32")["gradient_clipping"] == 0.0


def test_bf16_raises_the_zero_stage_and_auto_needs_resolving():
    cfg = load_config(None, ["train.precision=bf16", "train.zero_stage=0"])
    assert deepspeed_config(cfg, 1)["zero_optimization"]["stage"] == 1  # fp32 master weights need ZeRO >= 1
    auto = load_config(None)
    assert auto.train.precision == "auto"
    assert deepspeed_config(auto, 1, "fp32")["zero_optimization"]["stage"] == 0
    assert deepspeed_config(auto, 1, "bf16")["bf16"] == {"enabled": True}
    with pytest.raises(ValueError, match="auto"):
        deepspeed_config(auto, 1)


def test_flatten_names_every_leaf():
    flat = flatten(load_config(Path("configs/quickstart.yaml")))
    assert flat["model.modalities.0.name"] == "mnist" and flat["train.max_steps"] > 0


@pytest.mark.parametrize("command", [["meme_scale/train.py"], ["-m", "meme_scale.cli", "train"]])
def test_help_lists_every_key_with_its_doc_and_default(command):
    out = subprocess.run(
        [sys.executable, *command, "--help"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    keys = describe_keys()
    assert {key for key, *_ in keys} >= set(flatten(load_config(None)))  # every key of the schema
    for key, kind, default, doc in keys:
        assert doc, f"{key} has no doc"
        assert f"  {key} ({kind}, default {default!r})\n      {doc}" in out, key


def test_a_wrong_allowed_value_names_key_file_and_the_allowed_values(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("data: {missing: both}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: key 'data.missing' must be one of ['s', 't', 'either'], got 'both'"


def test_every_doc_is_one_line():
    assert all("\n" not in doc for *_, doc in describe_keys())
