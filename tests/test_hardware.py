"""Precision and threads chosen from the hardware: the choice follows the bf16 probe's measurement, a
slow explicit bf16 is warned about with its measured slowdown, threads divide the cores among ranks."""

from __future__ import annotations

import logging

import pytest
import torch

from meme_scale.hardware import (
    available_cores,
    configure_threads,
    probe_bf16_matmul,
    ranks_sharing_my_cores,
    resolve_precision,
    resolve_threads,
)

CPU = torch.device("cpu")


def _measured(speedup: float):
    """A stand-in for the probe's measurement (the rest of the resolution is real)."""
    return lambda: {"fp32_gflops": 100.0, "bf16_gflops": 100.0 * speedup, "bf16_speedup": speedup}


def test_auto_resolves_to_fp32_when_the_bf16_probe_is_slow():
    choice = resolve_precision("auto", CPU, probe=_measured(0.002))  # AVX2-only: bf16 emulated
    assert choice.precision == "fp32"
    assert "0.2 GFLOP/s" in choice.reason and "fp32" in choice.reason
    assert choice.probe["bf16_speedup"] == 0.002 and "cpu_capability" in choice.probe


def test_auto_resolves_to_bf16_when_the_bf16_probe_is_fast():
    choice = resolve_precision("auto", CPU, probe=_measured(2.7))  # AVX-512 BF16
    assert choice.precision == "bf16" and "2.70x" in choice.reason


def test_explicit_bf16_on_a_slow_cpu_runs_with_a_warning_naming_the_slowdown(caplog):
    with caplog.at_level(logging.WARNING, logger="meme_scale.hardware"):
        choice = resolve_precision("bf16", CPU, probe=_measured(0.01))
    assert choice.precision == "bf16"
    assert "100x slower than fp32" in caplog.text and "auto would choose fp32" in caplog.text


def test_fp32_needs_no_probe_and_fp16_needs_a_gpu():
    def never():
        raise AssertionError("fp32 must not run the probe")

    assert resolve_precision("fp32", CPU, probe=never).precision == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", CPU, probe=never)


def test_the_real_probe_measures_both_dtypes():
    rates = probe_bf16_matmul(size=64, repeats=1)
    assert rates["fp32_gflops"] > 0 and rates["bf16_gflops"] > 0
    assert rates["bf16_speedup"] == pytest.approx(rates["bf16_gflops"] / rates["fp32_gflops"])


def test_ranks_sharing_cores_counts_same_host_overlapping_affinity():
    a, b = frozenset({0, 1}), frozenset({2, 3})
    peers = [("n1", a), ("n1", a), ("n1", b), ("n2", a)]
    assert (
        ranks_sharing_my_cores(peers, 0) == 2
    )  # rank 1 shares its cores; rank 2 is bound elsewhere; n2 is another node
    assert ranks_sharing_my_cores(peers, 2) == 1
    assert ranks_sharing_my_cores(peers, 3) == 1


def test_threads_come_from_config_then_env_then_cores():
    cores = available_cores()
    assert resolve_threads(3, sharing=2, env={"OMP_NUM_THREADS": "5"}) == (3, "train.threads")
    assert resolve_threads(0, sharing=2, env={"OMP_NUM_THREADS": "5"}) == (5, "OMP_NUM_THREADS")
    threads, reason = resolve_threads(0, sharing=2, env={})
    assert threads == max(1, cores // 2) and "shared by 2 rank(s)" in reason
    assert resolve_threads(0, sharing=10 * cores, env={})[0] == 1


def test_configure_threads_sets_torch_threads():
    before = torch.get_num_threads()
    try:
        chosen = configure_threads(1, 0, gather=lambda obj: [obj])
        assert chosen["threads"] == torch.get_num_threads() == 1 and chosen["ranks_sharing_cores"] == 1
    finally:
        torch.set_num_threads(before)
