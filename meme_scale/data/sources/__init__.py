"""Converters from raw datasets to shards: one module per ``tools/make_shards.py`` subcommand.

Why a registry: the CLI stays a thin loop over it, and each converter owns its own arguments.
A converter module defines

- ``HELP``: one line shown by ``make_shards.py --help``;
- ``add_arguments(parser)``: its argparse options (``--out`` at least);
- ``run(args) -> str``: converts with ``meme_scale.data.writer.ShardWriter`` and returns a one-line
  summary (counts and out dir; the CLI appends the seconds).

Heavy or optional imports (the raw-data packages) belong inside ``run`` so that listing the
subcommands never needs them. To add one, write ``sources/<module>.py`` and register it here.
``common.py`` holds what converters share (the --skip-bad policy, image loading, splits) and
``fakeraw.py`` writes small inputs in the original raw formats (tests, ``tools/bench_data.py``).
"""
from __future__ import annotations

import importlib
from types import ModuleType

# subcommand -> module name under meme_scale.data.sources
SOURCES: dict[str, str] = {
    "quickstart": "quickstart",
    "mnist-svhn": "mnist_svhn",
    "cub": "cub",
    "custom": "custom",
}


def load_source(name: str) -> ModuleType:
    """The converter module behind a subcommand name."""
    if name not in SOURCES:
        raise ValueError(f"unknown data source {name!r}; known: {sorted(SOURCES)}")
    return importlib.import_module(f"{__name__}.{SOURCES[name]}")
