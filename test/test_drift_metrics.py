"""Drift metrics with known answers, the gate, and the drift config file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from daptq_ros.config_util import ConfigError
from daptq_ros.drift.config import DofThreshold, DriftConfig, KinematicsConfig, Thresholds, load_drift_config
from daptq_ros.drift.metrics import (
    cumulative_drift,
    dof_error_stats,
    evaluate_gate,
    horizon_errors,
    sqnr_db,
    step_displacements,
    time_to_threshold,
    virtual_chain_jacobian,
)
from daptq_ros.drift.replay import executed_actions
from daptq_ros.runtime.chunking import ChunkingConfig

REPO = Path(__file__).resolve().parents[1]


def test_dof_error_stats_known_values():
    err = np.array([[0.0, -1.0], [1.0, 2.0], [2.0, -3.0], [3.0, 4.0], [4.0, 5.0]])
    s = dof_error_stats(err)
    np.testing.assert_allclose(s["mean"], [2.0, 3.0])
    np.testing.assert_allclose(s["max"], [4.0, 5.0])
    np.testing.assert_allclose(s["p95"], [3.8, 4.8])  # linear interpolation between the top two
    with pytest.raises(ValueError, match="N>=1"):
        dof_error_stats(np.zeros((0, 2)))


def test_horizon_errors_grow_with_index():
    ref = np.zeros((5, 4, 2))
    cand = ref + np.arange(4)[None, :, None] * 0.1
    h = np.asarray(horizon_errors(ref, cand)["mean"])
    np.testing.assert_allclose(h[:, 0], [0.0, 0.1, 0.2, 0.3])


def test_ee_delta_drift_integrates_and_resets_per_episode():
    ref = np.zeros((6, 4))
    cand = np.zeros((6, 4))
    cand[:, 0] = 0.5  # constant dx error of 0.5 units, gripper error ignored
    cand[:, 3] = 1.0
    kin = KinematicsConfig(action_scale=0.01)
    disp = step_displacements(ref, cand, kin)
    np.testing.assert_allclose(disp[:, 0], 0.005)
    np.testing.assert_allclose(disp[:, 1:], 0.0)
    episodes = np.array([0, 0, 0, 1, 1, 1])
    drift = np.linalg.norm(cumulative_drift(disp, episodes), axis=1)
    np.testing.assert_allclose(drift, [0.005, 0.010, 0.015, 0.005, 0.010, 0.015])
    t = np.array([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
    assert time_to_threshold(drift, t, episodes, 0.009) == {0: pytest.approx(0.1), 1: pytest.approx(0.1)}
    assert time_to_threshold(drift, t, episodes, 1.0) == {0: None, 1: None}


def test_matrix_jacobian_for_joint_space():
    kin = KinematicsConfig(model="matrix", action_scale=1.0, jacobian=[[1, 0], [0, 2], [0, 0]])
    disp = step_displacements(np.zeros((1, 2)), np.array([[0.1, 0.3]]), kin)
    np.testing.assert_allclose(disp, [[0.1, 0.6, 0.0]])
    with pytest.raises(ValueError, match="3 x A"):
        KinematicsConfig(model="matrix", jacobian=[[1, 0]])


def test_virtual_chain_jacobian_known_values_and_quant_parity():
    # All-zero increments: the chain lies along +y; J_y counts the links after each joint.
    jac = virtual_chain_jacobian(np.zeros(4))
    np.testing.assert_allclose(jac, [[0, 0, 0, 0], [3, 2, 1, 0], [1, 1, 1, 1]], atol=1e-12)
    # Same as the quantizer's torch implementation (DA-PTQ §3.3) on random increments.
    torch = pytest.importorskip("torch")
    from daptq_ros.quant.drift_loss import virtual_chain_jacobian as torch_jacobian

    q = np.random.default_rng(0).uniform(-1, 1, 7)
    np.testing.assert_allclose(
        jac := virtual_chain_jacobian(q), torch_jacobian(torch.tensor(q)).numpy(), atol=1e-9
    )
    assert np.all(jac[:2, -1] == 0)
    kin = KinematicsConfig(model="virtual_chain", action_scale=1.0)
    disp = step_displacements(np.zeros((1, 3)), np.array([[0.0, 0.0, 0.1]]), kin)
    np.testing.assert_allclose(disp, [[0.0, 0.0, 0.0]], atol=1e-12)  # last joint moves no link


def test_sqnr_and_gate():
    ref = np.array([[1.0, 1.0], [1.0, 1.0]])
    assert sqnr_db(ref, ref) == [float("inf"), float("inf")]
    assert sqnr_db(ref, ref * 1.1)[0] == pytest.approx(20.0)
    th = Thresholds(
        default=DofThreshold(mean=0.1, max=0.5),
        per_dof={"g": DofThreshold(max=2.0)},
        drift_m=0.01,
        min_time_to_threshold_s=2.0,
    )
    stats = {"mean": [0.05, 0.9], "p95": [0.1, 1.0], "max": [0.6, 1.5]}
    checks = {c.name: c.passed for c in evaluate_gate(["x", "g"], stats, 0.004, 1.0, th)}
    assert checks == {
        "x.mean": True,
        "x.max": False,
        "g.max": True,
        "drift_m": True,
        "min_time_to_threshold_s": False,
    }
    with pytest.raises(ValueError, match="unknown DoF"):
        evaluate_gate(
            ["x"],
            {"mean": [0], "p95": [0], "max": [0]},
            0.0,
            None,
            Thresholds(per_dof={"nope": DofThreshold()}),
        )


def test_executed_actions_follow_chunking_rule():
    chunks = np.arange(6 * 8 * 1, dtype=np.float32).reshape(6, 8, 1)  # chunk i = 8i .. 8i+7
    ep = np.array([0, 0, 0, 0, 0, 1])
    out = executed_actions(chunks, ep, ChunkingConfig(mode="execute", execute_steps=4))
    # Frames 0-3 run chunk 0's first 4 actions, frame 4 re-plans (chunk 4), frame 5 is a new episode.
    np.testing.assert_array_equal(out[:, 0], [0, 1, 2, 3, 32, 40])


def test_config_file_and_bad_keys(tmp_path):
    cfg = load_drift_config(REPO / "config" / "drift.yaml")
    assert cfg.thresholds.per_dof["gripper"].max is None and cfg.thresholds.per_dof["gripper"].p95 == 0.3
    assert cfg.kinematics.action_scale == 0.01
    assert cfg.topics.image == DriftConfig().topics.image
    loose = load_drift_config(REPO / "config" / "drift_sim_gate.yaml")
    assert loose.thresholds.drift_m == 0.04 and loose.thresholds.default.max is None
    assert loose.thresholds.default.p95 == cfg.thresholds.default.p95 and loose.topics == cfg.topics
    bad = tmp_path / "bad.yaml"
    bad.write_text("drift:\n  thresholds:\n    drift_mm: 3\n")
    with pytest.raises(ConfigError, match="drift_mm"):
        load_drift_config(bad)
    bad.write_text("drift:\n  kinematics:\n    model: tcp\n")
    with pytest.raises(ConfigError, match="model must be one of"):
        load_drift_config(bad)
    bad.write_text("drift:\n  topics:\n    episode_on_instruction: sometimes\n")
    with pytest.raises(ConfigError, match="episode_on_instruction"):
        load_drift_config(bad)


def test_topic_overrides():
    from daptq_ros.drift.cli import apply_topic_overrides

    cfg = DriftConfig()
    apply_topic_overrides(cfg, ["image=/cam/rgb", "commands=/a,/b", "joint_states=/js"])
    assert (cfg.topics.image, cfg.topics.commands, cfg.topics.joint_states) == (
        "/cam/rgb",
        ["/a", "/b"],
        "/js",
    )
    apply_topic_overrides(cfg, ["commands="])
    assert cfg.topics.commands == []
    for bad in ["camera=/x", "image", "image="]:
        with pytest.raises(ConfigError, match="--topics"):
            apply_topic_overrides(cfg, [bad])
