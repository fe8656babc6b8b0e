"""Proof of life on the simulated robot: launch policy + sim bridge, record, drift-check the bag.

Slow (Meta-World + two ROS processes): run with ``pytest -m slow test/test_bag_sim.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_drift_fixtures import export_tiny_artifact

pytest.importorskip("rclpy")
pytest.importorskip("metaworld")

from daptq_ros.cli import main
from daptq_ros.drift.bag_io import BagFrames, BagTopics


@pytest.mark.slow
def test_record_sim_episodes_then_drift_check(tmp_path, monkeypatch):
    monkeypatch.setenv("ROS_DOMAIN_ID", str(90 + os.getpid() % 40))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    fp = export_tiny_artifact(tmp_path / "fp")
    fp_copy = export_tiny_artifact(tmp_path / "fp_copy")
    broken = export_tiny_artifact(tmp_path / "broken", perturb=0.3)
    bag = tmp_path / "bag"
    env = dict(os.environ)
    recorder = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daptq_ros.cli",
            "record",
            "--out",
            str(bag),
            "--discovery-timeout",
            "90",
            "--duration",
            "170",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    launch = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daptq_ros.cli",
            "launch",
            "policy",
            "--sim",
            "--artifact",
            str(fp),
            "--tasks",
            "reach-v3",
            "--episodes",
            "2",
            "--max-steps",
            "15",
            "--timeout",
            "150",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        out, _ = launch.communicate(timeout=180)
    finally:
        recorder.send_signal(signal.SIGINT)  # the episodes are over: finalize the bag
        rec_out, rec_err = recorder.communicate(timeout=60)
    assert launch.returncode == 0, out[-3000:]
    assert recorder.returncode == 0, rec_err[-3000:]
    assert json.loads(rec_out.strip().splitlines()[-1])["messages"]["/instruction"] == 2
    frames = list(BagFrames(bag, BagTopics()))
    # Lockstep: 15 steps per episode; the recorder may join a few frames late.
    assert 20 <= len(frames) <= 30 and {f.episode for f in frames} == {0, 1}
    assert {f.instruction for f in frames} == {"reach the red goal position"}
    assert all(f.image.shape == (128, 128, 3) for f in frames)

    def check(candidate, name):
        code = main(
            [
                "drift-check",
                "--bag",
                str(bag),
                "--reference",
                str(fp),
                "--candidate",
                str(candidate),
                "--report",
                str(tmp_path / f"report_{name}"),
                "--no-progress",
            ]
        )
        return code, json.loads((tmp_path / f"report_{name}" / "report.json").read_text())

    code, summary = check(fp_copy, "same")
    assert code == 0 and summary["drift"]["max_m"] == 0.0
    # The policy drove the robot: the reference replay reproduces the recorded commands.
    assert summary["recorded_commands"]["available"]
    code, summary = check(broken, "broken")
    assert code == 1 and summary["failed_checks"]
