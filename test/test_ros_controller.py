"""The ROS-free core of policy_node (instruction switching, chunk execution, safety filter),
driven by real exported ONNX artifacts."""

import numpy as np
import pytest
from test_ros_support import INSTRUCTION, build_artifact, build_nan_artifact

from daptq_ros.nodes.controller import Counters, PolicyController, SafetyFilter
from daptq_ros.policy_api import Observation
from daptq_ros.runtime.chunking import ChunkingConfig
from daptq_ros.runtime.onnx_policy import OnnxStepPolicy

PROPRIO = np.array([0.05, 0.6, 0.2, 0.5], np.float32)


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    art = build_artifact(tmp_path_factory.mktemp("ctl") / "art")
    return OnnxStepPolicy(art, providers=["cpu"], threads=1, allow_encode=False)


def _obs(value=100, proprio=PROPRIO):
    return Observation(image=np.full((128, 128, 3), value, np.uint8), proprio=proprio)


def _controller(policy, execute_steps=4, default="", **safety):
    lims = {"scale": [1.0] * 4, "offset": [0.0] * 4, "low": [-1.0] * 4, "high": [1.0] * 4,
            "max_delta": [0.0] * 4, **safety}
    return PolicyController(policy, ChunkingConfig("execute", execute_steps), SafetyFilter(**lims),
                            default_instruction=default, counters=Counters())


def test_no_instruction_no_command(policy):
    ctl = _controller(policy)
    out = ctl.step(_obs())
    assert out.status == "no_instruction" and out.command is None and ctl.counters.predictions == 0


def test_executes_k_of_h_and_switches_instruction_at_chunk_boundary(policy):
    ctl = _controller(policy, execute_steps=3, default=INSTRUCTION)
    first = ctl.step(_obs())
    assert first.status == "ok" and first.chunk is not None and ctl.active_instruction == INSTRUCTION
    expected = first.chunk[:3]
    ctl.set_instruction("unknown words")  # must wait for the boundary (2 queued actions left)
    got = [first.command] + [ctl.step(_obs()).command for _ in range(2)]
    np.testing.assert_allclose(np.stack(got), np.clip(expected, -1, 1), atol=1e-6)
    assert ctl.counters.predictions == 1 and ctl.counters.unknown_instructions == 0
    out = ctl.step(_obs())  # boundary: the unknown instruction is rejected, the old one continues
    assert ctl.counters.unknown_instructions == 1 and ctl.active_instruction == INSTRUCTION
    assert out.status == "ok" and ctl.counters.predictions == 2


def test_safety_scale_clamp_and_rate_limit(policy):
    ctl = _controller(policy, execute_steps=8, default=INSTRUCTION, scale=[10.0] * 4,
                      low=[-0.5] * 4, high=[0.5] * 4, max_delta=[0.1] * 4)
    outs = [ctl.step(_obs()) for _ in range(8)]
    cmds = np.stack([o.command for o in outs])
    raw = np.stack([o.raw for o in outs])
    assert np.all(np.abs(cmds) <= 0.5 + 1e-6)
    assert np.all(np.abs(np.diff(cmds, axis=0)) <= 0.1 + 1e-6)
    assert ctl.counters.clamps >= 1 and np.any(np.abs(raw * 10) > 0.5)


def test_non_finite_chunk_is_never_commanded(tmp_path):
    nan_policy = OnnxStepPolicy(build_nan_artifact(tmp_path / "nan"), providers=["cpu"], threads=1)
    ctl = _controller(nan_policy, default=INSTRUCTION)
    ok = ctl.step(_obs(proprio=np.array([0.1, 0.6, 0.2, 0.5], np.float32)))
    assert ok.status == "ok" and np.all(np.isfinite(ok.command))
    for _ in range(3):  # drain the queued actions of the good chunk, then re-plan on bad input
        ctl.step(_obs(proprio=np.array([0.1, 0.6, 0.2, 0.5], np.float32)))
    bad = ctl.step(_obs(proprio=np.array([-0.5, 0.6, 0.2, 0.5], np.float32)))
    assert bad.status == "nonfinite" and bad.command is None
    assert ctl.counters.nonfinite_events == 1 and ctl.counters.commands == 0
    again = ctl.step(_obs(proprio=np.array([0.1, 0.6, 0.2, 0.5], np.float32)))  # re-plans at once
    assert again.status == "ok" and again.chunk is not None


def test_safety_filter_rejects_wrong_dimension():
    f = SafetyFilter([1.0] * 4, [0.0] * 4, [-1.0] * 4, [1.0] * 4, [0.0] * 4)
    with pytest.raises(ValueError, match="expects 4"):
        f.apply(np.zeros(3))
    with pytest.raises(ValueError, match="different lengths"):
        SafetyFilter([1.0] * 4, [0.0] * 3, [-1.0] * 4, [1.0] * 4, [0.0] * 4)
    np.testing.assert_array_equal(f.zero(), np.zeros(4, np.float32))
