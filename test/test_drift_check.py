"""Replay logic and the drift-check CLI end to end on tiny real artifacts (exit codes 0 / 1 / 2)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_drift_fixtures import LinearStepPolicy, export_tiny_artifact, synthetic_episodes, topics

from daptq_ros.cli import main
from daptq_ros.drift.bag_io import BagFrames
from daptq_ros.drift.bag_writer import write_episodes_bag
from daptq_ros.drift.replay import ReplayError, frame_noise, replay


@pytest.fixture(scope="module")
def bag(tmp_path_factory):
    return write_episodes_bag(tmp_path_factory.mktemp("bag") / "bag", synthetic_episodes(3, 16), topics())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    return {
        "fp": export_tiny_artifact(root / "fp"),
        "fp_copy": export_tiny_artifact(root / "fp_copy"),
        "broken": export_tiny_artifact(root / "broken", perturb=0.3),
    }


def test_replay_identical_policies_have_zero_error(bag):
    frames = BagFrames(bag, topics())
    result = replay(frames, LinearStepPolicy(), LinearStepPolicy(), 4, progress=False)
    assert result.n_frames == 48 and sorted(result.instructions) == [0, 1, 2]
    np.testing.assert_array_equal(result.reference_chunks, result.candidate_chunks)
    assert result.recorded_commands.shape == (48, 4)
    # Both policies saw the same seeded noise: a fresh policy fed frame_noise reproduces the chunk.
    f0 = next(iter(BagFrames(bag, topics())))
    probe = LinearStepPolicy()
    probe.reset(f0.instruction, 0)
    from daptq_ros.policy_api import Observation

    expect = probe.predict_chunk(Observation(f0.image, f0.proprio), frame_noise(0, 0, 8, 4))
    np.testing.assert_allclose(result.reference_chunks[0], expect)


def test_replay_at_replan_frames_equals_dense_replay(bag):
    from daptq_ros.runtime.chunking import ChunkingConfig

    kw = dict(chunking=ChunkingConfig(execute_steps=4), progress=False, parallel=False)
    sparse = replay(BagFrames(bag, topics()), LinearStepPolicy(), LinearStepPolicy(scale=1.2), 4, **kw)
    dense = replay(
        BagFrames(bag, topics()), LinearStepPolicy(), LinearStepPolicy(scale=1.2), 4, every_frame=True, **kw
    )
    assert sparse.reference_chunks.shape[0] == 12 and dense.reference_chunks.shape[0] == 48  # 3 episodes x 16
    np.testing.assert_allclose(sparse.candidate_actions, dense.candidate_actions)
    np.testing.assert_allclose(sparse.reference_actions, dense.reference_actions)
    assert np.abs(sparse.candidate_actions - sparse.reference_actions).max() > 1e-3


def test_replay_perturbed_policy_differs_and_chunk_mismatch_is_rejected(bag):
    result = replay(
        BagFrames(bag, topics()),
        LinearStepPolicy(),
        LinearStepPolicy(scale=1.3),
        4,
        max_frames=10,
        parallel=False,
        progress=False,
    )
    assert result.n_frames == 10
    assert np.abs(result.candidate_actions - result.reference_actions).mean() > 1e-3
    with pytest.raises(ReplayError, match="chunk sizes differ"):
        replay(
            BagFrames(bag, topics()), LinearStepPolicy(), LinearStepPolicy(chunk_size=4), 4, progress=False
        )


def _drift_check(bag, ref, cand, report, *extra):
    return main(
        [
            "drift-check",
            "--bag",
            str(bag),
            "--reference",
            str(ref),
            "--candidate",
            str(cand),
            "--report",
            str(report),
            "--no-progress",
            *extra,
        ]
    )


def test_identical_artifacts_report_zero_drift_and_pass(bag, artifacts, tmp_path):
    report = tmp_path / "report"
    assert (
        _drift_check(bag, artifacts["fp"], artifacts["fp_copy"], report, "--json", str(tmp_path / "s.json"))
        == 0
    )
    summary = json.loads((report / "report.json").read_text())
    assert summary["passed"] and summary["frames"] == 48 and summary["episodes"] == 3
    assert "gripper" in summary["thresholds"]["per_dof"]  # the shipped config/drift.yaml is the default
    assert summary["drift"]["max_m"] == 0.0
    assert all(v == 0.0 for dof in summary["action_error"].values() for v in dof.values())
    assert summary["recorded_commands"]["available"]
    for name in [
        "report.md",
        "report.json",
        "drift.png",
        "error_hist.png",
        "horizon_error.png",
        *summary["plots"],
    ]:
        assert (report / name).stat().st_size > 0, name
    assert "# Drift check: PASS" in (report / "report.md").read_text()
    assert json.loads((tmp_path / "s.json").read_text())["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "s.json"]  # no partial dirs left


def test_perturbed_artifact_fails_the_gate(bag, artifacts, tmp_path, capsys):
    report = tmp_path / "report"
    assert _drift_check(bag, artifacts["fp"], artifacts["broken"], report) == 1
    summary = json.loads((report / "report.json").read_text())
    assert not summary["passed"] and summary["failed_checks"]
    assert summary["drift"]["max_m"] > 0
    hor = np.asarray(summary["horizon_error"]["mean"])
    assert hor.shape == (8, 4) and np.all(hor > 0)
    md = (report / "report.md").read_text()
    assert "# Drift check: FAIL" in md and "**FAIL**" in md
    assert "FAILED" in capsys.readouterr().out
    # Loose thresholds (from a config file) let the same pair pass; a re-run replaces the old report.
    loose = tmp_path / "loose.yaml"
    loose.write_text("drift:\n  thresholds:\n    default: {mean: 10, p95: 10, max: 10}\n    drift_m: 10\n")
    assert _drift_check(bag, artifacts["fp"], artifacts["broken"], report, "--thresholds", str(loose)) == 0
    assert json.loads((report / "report.json").read_text())["passed"]


@pytest.mark.parametrize(
    "case",
    [
        "missing_bag",
        "truncated_bag",
        "missing_topic",
        "bad_artifact",
        "bad_config",
        "occupied_report",
        "unknown_instruction",
    ],
)
def test_bad_input_exits_2_and_writes_no_report(case, bag, artifacts, tmp_path, caplog):
    import shutil

    ref, cand, extra = artifacts["fp"], artifacts["fp_copy"], []
    the_bag = bag
    report = tmp_path / "report"
    expect = {
        "missing_bag": "does not exist",
        "truncated_bag": "truncated or corrupt",
        "missing_topic": "lacks topic",
        "bad_artifact": "not a policy artifact",
        "bad_config": "unknown config key",
        "occupied_report": "refusing to overwrite",
        "unknown_instruction": "is unusable with the reference",
    }[case]
    if case == "missing_bag":
        the_bag = tmp_path / "nope"
    elif case == "truncated_bag":
        the_bag = shutil.copytree(bag, tmp_path / "cut")
        data = the_bag / "bag.mcap"
        data.write_bytes(data.read_bytes()[:5000])
    elif case == "missing_topic":
        extra = ["--topics", "image=/camera/none"]
    elif case == "bad_artifact":
        cand = tmp_path
    elif case == "bad_config":
        (tmp_path / "c.yaml").write_text("drift:\n  treshold: 1\n")
        extra = ["--thresholds", str(tmp_path / "c.yaml")]
    elif case == "occupied_report":
        report.mkdir()
        (report / "keep.txt").write_text("user data")
    elif case == "unknown_instruction":
        eps = synthetic_episodes(1, 4)
        eps[0].instruction = "juggle three balls"
        the_bag = write_episodes_bag(tmp_path / "odd", eps, topics())
    before = set(tmp_path.iterdir())
    assert _drift_check(the_bag, ref, cand, report, *extra) == 2
    assert expect in caplog.text
    after = set(tmp_path.iterdir()) - before
    assert not after, f"left behind {after}"
    if case == "occupied_report":
        assert (report / "keep.txt").read_text() == "user data"
    else:
        assert not report.exists()
