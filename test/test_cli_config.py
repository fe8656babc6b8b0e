"""The `daptq` dispatcher and the shared YAML config loader."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from daptq_ros import cli
from daptq_ros.config_util import ConfigError, load_config


@dataclasses.dataclass
class Inner:
    rate_hz: float = 10.0


@dataclasses.dataclass
class Recipe:
    method: str = "daptq"
    bits: int = 4
    mode: Literal["joint", "ee"] = "ee"
    names: list[str] = dataclasses.field(default_factory=list)
    inner: Inner = dataclasses.field(default_factory=Inner)
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.bits not in (2, 3, 4, 8, 16):
            raise ValueError(f"bits must be one of 2, 3, 4, 8, 16, got {self.bits}")


def test_load_config_from_yaml(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("method: gptq\nbits: 3\nnames: [a, b]\ninner: {rate_hz: 30}\nbudget: 4.25\n")
    recipe = load_config(Recipe, path)
    assert recipe == Recipe(method="gptq", bits=3, names=["a", "b"], inner=Inner(30.0), budget=4.25)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"methd": "rtn"}, "unknown config key methd"),
        ({"inner": {"rate": 3}}, "unknown config key inner.rate"),
        ({"bits": "four"}, "bits: expected an integer"),
        ({"bits": 5}, "bits must be one of"),
        ({"mode": "cartesian"}, "mode: 'cartesian' is not one of"),
        ({"names": "a"}, "names: expected a list"),
        ({"inner": {"rate_hz": True}}, "inner.rate_hz: expected a number"),
    ],
)
def test_load_config_errors_name_the_key(data, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(Recipe, data)


def test_load_config_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Recipe, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Recipe, bad)


def test_load_config_section(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("quantize:\n  bits: 8\n")
    assert load_config(Recipe, path, section="quantize").bits == 8
    with pytest.raises(ConfigError, match="missing top-level key 'export'"):
        load_config(Recipe, path, section="export")


def test_cli_help_lists_every_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.SUBCOMMANDS:
        assert name in out


def test_cli_subcommand_tables_agree():
    assert set(cli.SUBCOMMANDS) == set(cli.SUBCOMMAND_HELP)


def test_cli_unknown_command_exits_with_usage_error():
    proc = subprocess.run(
        [sys.executable, "-m", "daptq_ros.cli", "frobnicate"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 2
    assert "unknown command 'frobnicate'" in proc.stderr
