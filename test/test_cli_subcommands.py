"""Every `daptq` subcommand module honours the dispatcher contract and answers --help."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from daptq_ros import cli


@pytest.mark.parametrize("name", sorted(cli.SUBCOMMANDS))
def test_subcommand_module_contract(name):
    module = importlib.import_module(cli.SUBCOMMANDS[name])
    assert isinstance(module.HELP, str) and module.HELP
    assert callable(module.add_arguments)
    assert callable(module.run)


@pytest.mark.parametrize("name", ["quantize", "export", "drift-check", "launch", "demo"])
def test_subcommand_help_runs(name):
    proc = subprocess.run([sys.executable, "-m", "daptq_ros.cli", name, "--help"],
                          capture_output=True, text=True, check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage: daptq" in proc.stdout
