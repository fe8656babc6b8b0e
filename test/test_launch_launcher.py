"""`daptq launch` failure handling: bad overrides are refused before any process starts, and a
crashing node makes the launcher exit non-zero with the crash reported."""

import json
import subprocess
import sys

import pytest
from test_ros_support import REPO, build_artifact, ros_env


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("launcher") / "art")


def _launch(args, timeout=120):
    return subprocess.run([sys.executable, "-m", "daptq_ros.cli", "launch", "policy", *args],
                          env=ros_env(), cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(["--set", "policy_node:warp:=9"], "parameter 'warp'"),
     (["--set", "policy_node:control_rate_hz:=0.0"], "parameter 'control_rate_hz'"),
     (["--set", "camera:x:=1"], "NODE:KEY:=VALUE"),
     (["--tasks", "fly-v3"], "fly-v3"),
     (["--params", "/nonexistent.yaml"], "not found")],
)
def test_bad_arguments_are_refused_before_start(artifact, extra, fragment):
    proc = _launch(["--artifact", str(artifact), *extra], timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert fragment in proc.stderr and "starting policy_node" not in proc.stderr


def test_missing_artifact_is_refused(tmp_path):
    proc = _launch(["--artifact", str(tmp_path / "none")], timeout=60)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_crashing_node_fails_the_launch(artifact, tmp_path):
    out = tmp_path / "r.json"
    # sim_bridge refuses max_steps 0 at start (exit 2): the launcher must report it and fail
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "config" / "policy.yaml").read_text().replace("max_steps: 200", "max_steps: 0"))
    proc = _launch(["--sim", "--artifact", str(artifact), "--params", str(bad), "--json", str(out)])
    assert proc.returncode == 2 and "max_steps" in proc.stderr  # refused by the launcher's file check
    # an unknown task passed through --set reaches the node, which refuses it and exits 2
    proc = _launch(["--sim", "--artifact", str(artifact), "--set", "sim_bridge:tasks:=[fly-v3]",
                    "--json", str(out)])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    report = json.loads(out.read_text())
    assert report["crashed"] == ["sim_bridge"] and report["exit_codes"]["sim_bridge"] == 2
    assert "policy_node" in report["exit_codes"] and not report["episodes"]  # stopped by the launcher
    assert "parameter 'tasks'" in proc.stderr and "CRASHED" in proc.stdout
