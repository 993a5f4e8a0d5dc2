"""Helpers for the converter tests: run ``tools/make_shards.py`` in-process (fast) or as a real CLI."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("make_shards_cli", os.path.join(REPO, "tools", "make_shards.py"))
make_shards = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_shards)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(capsys, *args: str) -> Result:
    """``make_shards.py ARGS`` in this process (the same main(); no interpreter start-up per call)."""
    capsys.readouterr()
    code = make_shards.main(list(args))
    out = capsys.readouterr()
    return Result(code, out.out, out.err)


def cli_subprocess(*args: str) -> subprocess.CompletedProcess:
    """The real command line, once per converter: ``python tools/make_shards.py ARGS``."""
    return subprocess.run(
        [sys.executable, "tools/make_shards.py", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def assert_nothing_left(parent, name: str = "out") -> None:
    """A failed conversion leaves neither OUT nor OUT.tmp-<pid> behind."""
    assert not [p for p in os.listdir(parent) if p == name or p.startswith(name + ".")], os.listdir(parent)
