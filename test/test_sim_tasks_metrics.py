"""MT10 task/instruction tables and the pure-numpy drift metrics (known answers)."""

import numpy as np
import pytest

from daptq_ros.sim import metrics
from daptq_ros.sim.tasks import (
    MT10_TASKS,
    all_instructions,
    canonical_instruction,
    instructions_for,
    parse_tasks,
    task_for_instruction,
)


def test_tasks_and_instructions_are_consistent():
    assert len(MT10_TASKS) == 10 and all(t.endswith("-v3") for t in MT10_TASKS)
    texts = all_instructions()
    assert len(texts) == 40 and len(set(texts)) == 40
    for task in MT10_TASKS:
        variants = instructions_for(task)
        assert len(variants) == 4 and variants[0] == canonical_instruction(task)
        for text in variants:
            assert task_for_instruction(text) == task
    assert canonical_instruction("drawer-open-v3") == "open the drawer"
    assert task_for_instruction("  Push the PUCK to the goal ") == "push-v3"


def test_unknown_task_and_instruction_errors_list_valid_names():
    with pytest.raises(ValueError, match=r"unknown task 'fly-v3'.*reach-v3"):
        canonical_instruction("fly-v3")
    with pytest.raises(ValueError, match="unknown instruction"):
        task_for_instruction("make coffee")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_tasks("reach-v3,nope")
    with pytest.raises(ValueError, match="empty task selection"):
        parse_tasks(" , ")


def test_parse_tasks():
    assert parse_tasks("all") == list(MT10_TASKS)
    assert parse_tasks("push-v3, reach-v3,push-v3") == ["push-v3", "reach-v3"]
    assert parse_tasks(["door-open-v3"]) == ["door-open-v3"]


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [  # published Wilson 95% intervals
        (8, 10, 0.4902, 0.9433),
        (0, 10, 0.0, 0.2775),
        (10, 10, 0.7225, 1.0),
        (50, 100, 0.4038, 0.5962),
    ],
)
def test_wilson_interval_known_values(k, n, lo, hi):
    got = metrics.wilson_interval(k, n)
    assert got == pytest.approx((lo, hi), abs=1e-4)


def test_wilson_interval_edge_cases():
    assert metrics.wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes=11"):
        metrics.wilson_interval(11, 10)
    summary = metrics.success_summary([True, False, True, True])
    assert summary["successes"] == 3 and summary["episodes"] == 4 and summary["success_rate"] == 0.75


def test_trajectory_divergence_constant_offset_and_padding():
    a = np.cumsum(np.full((20, 3), 0.01), axis=0)
    b = a + np.array([0.03, 0.0, 0.04])  # 5 cm everywhere
    d = metrics.trajectory_divergence(a, b)
    assert d["mean"] == pytest.approx(0.05) and d["final"] == pytest.approx(0.05)
    # b stops after 10 steps and holds its last position: distances grow by |0.01*sqrt(3)| per step.
    d = metrics.trajectory_divergence(a, a[:10])
    step = 0.01 * np.sqrt(3)
    expected = np.r_[np.zeros(10), step * np.arange(1, 11)]
    assert d["final"] == pytest.approx(10 * step)
    assert d["mean"] == pytest.approx(expected.mean())
    assert d["max"] == pytest.approx(10 * step)
    with pytest.raises(ValueError, match="same D"):
        metrics.trajectory_divergence(a, a[:, :2])


def test_pad_to_length():
    t = np.arange(6.0).reshape(3, 2)
    padded = metrics.pad_to_length(t, 5)
    assert padded.shape == (5, 2) and np.array_equal(padded[3:], np.repeat(t[-1:], 2, axis=0))
    with pytest.raises(ValueError, match="cannot pad"):
        metrics.pad_to_length(t, 2)


def test_action_rms_difference_uses_common_prefix():
    a = np.zeros((10, 4))
    b = np.zeros((6, 4))
    b[:, 0] = 0.5
    b[:3, 3] = 1.0
    rms = metrics.action_rms_difference(a, b)
    assert rms == pytest.approx([0.5, 0.0, 0.0, np.sqrt(0.5)])
    assert metrics.pooled_rms([np.array([1.0]), np.array([0.0])], [3, 1]) == pytest.approx([np.sqrt(0.75)])


def test_open_loop_error_aggregation():
    cand = np.zeros((5, 8, 4))
    ref = np.zeros((5, 1, 4))
    ref[..., 1] = -0.2  # reference chunk size 1: only chunk position 0 is compared
    err = metrics.open_loop_errors(cand, ref)
    assert err.shape == (5, 1, 4)
    e2 = np.full((3, 1, 4), 0.4)
    agg = metrics.aggregate_action_errors([err, e2])
    assert agg["steps"] == 8
    assert agg["mean_per_dof"] == pytest.approx([0.15, 0.275, 0.15, 0.15])
    assert agg["max_per_dof"] == pytest.approx([0.4, 0.4, 0.4, 0.4])
    assert np.asarray(agg["mean_per_horizon"]).shape == (1, 4)
    assert metrics.aggregate_action_errors([])["steps"] == 0
    with pytest.raises(ValueError, match="same H and A"):
        metrics.aggregate_action_errors([np.zeros((2, 1, 4)), np.zeros((2, 2, 4))])


def test_paired_success_counts():
    c = [True, True, False, False, True]
    r = [True, False, True, False, True]
    assert metrics.paired_success_counts(c, r) == {
        "both": 2, "only_reference": 1, "only_candidate": 1, "neither": 1,
    }
    with pytest.raises(ValueError, match="equal lengths"):
        metrics.paired_success_counts(c, r[:2])
