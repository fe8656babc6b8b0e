"""Parameter validation of policy_node / sim_bridge (pure Python: no rclpy, no DDS)."""

import subprocess
import sys

import pytest
from test_ros_support import REPO

from daptq_ros.nodes.params import (
    POLICY_NODE_SPECS,
    SIM_BRIDGE_SPECS,
    ParamError,
    PolicyNodeParams,
    SimBridgeParams,
    field_names,
    per_dof,
    read_params_file,
    validate_policy_params,
    validate_sim_params,
)

CONFIG = REPO / "config" / "policy.yaml"


def _valid(**changes):
    return {"artifact_dir": "/tmp/art", **changes}


def test_ros_free_modules_do_not_import_rclpy():
    code = ("import sys, daptq_ros.launcher, daptq_ros.nodes.params, daptq_ros.nodes.controller, "
            "daptq_ros.nodes.summary; sys.exit(int('rclpy' in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, timeout=60).returncode == 0


def test_specs_match_dataclasses():
    assert [s.name for s in POLICY_NODE_SPECS] == field_names(PolicyNodeParams)
    assert [s.name for s in SIM_BRIDGE_SPECS] == field_names(SimBridgeParams)
    assert all(s.description for s in (*POLICY_NODE_SPECS, *SIM_BRIDGE_SPECS))


def test_shipped_params_file_is_valid():
    sections = read_params_file(CONFIG)
    assert set(sections) == {"/**", "/**/policy_node", "/**/sim_bridge"}
    p = validate_policy_params({**sections["/**/policy_node"], "artifact_dir": "/x"})
    assert p.providers == ("tensorrt", "cuda", "cpu") and p.joint_names is None
    s = validate_sim_params(sections["/**/sim_bridge"])
    assert s.max_steps == 200 and s.tasks == ("reach-v3",)


@pytest.mark.parametrize(
    ("values", "name", "fragment"),
    [
        ({"artifact_dir": ""}, "artifact_dir", "empty"),
        (_valid(control_rate_hz=0.0), "control_rate_hz", "below the minimum"),
        (_valid(control_rate_hz="fast"), "control_rate_hz", "expected a number"),
        (_valid(execute_steps=2.5), "execute_steps", "expected an integer"),
        (_valid(output_mode="cartesian"), "output_mode", "not one of"),
        (_valid(fault_action="brake"), "fault_action", "not one of"),
        (_valid(autostart="yes"), "autostart", "true/false"),
        (_valid(action_min=[0.5], action_max=[0.1]), "action_min", "greater than action_max"),
        (_valid(action_min=[-1.0, -1.0], action_max=[1.0, 1.0, 1.0]), "action_min", "action_max has 3"),
        (_valid(max_delta=[-0.1]), "max_delta[0]", "below the minimum"),
        (_valid(action_scale=[]), "action_scale", "at least one"),
        (_valid(action_scale=[float("nan")]), "action_scale[0]", "finite"),
        (_valid(proprio_joint_names=["a", "a"]), "proprio_joint_names", "duplicate"),
        (_valid(joint_names=[""]), "joint_names", "non-empty"),
        (_valid(providers=[]), "providers", "at least one"),
        (_valid(image_width=-1), "image_width", "below the minimum"),
        (_valid(warp_speed=9), "warp_speed", "unknown parameter"),
    ],
)
def test_policy_param_errors_name_the_parameter(values, name, fragment):
    with pytest.raises(ParamError) as info:
        validate_policy_params(values)
    assert info.value.name == name
    assert f"parameter '{name}'" in str(info.value) and fragment in str(info.value)


@pytest.mark.parametrize(
    ("values", "name"),
    [({"tasks": []}, "tasks"), ({"max_steps": 0}, "max_steps"),
     ({"action_names": ["a", "b"]}, "action_names"), ({"control_mode": "async"}, "control_mode"),
     ({"episodes": 3}, "episodes")],
)
def test_sim_param_errors_name_the_parameter(values, name):
    with pytest.raises(ParamError) as info:
        validate_sim_params(values)
    assert info.value.name == name


def test_per_dof_broadcast_and_length_check():
    p = validate_policy_params(_valid(action_scale=[2.0], action_max=[1.0, 1.0, 1.0, 0.5]))
    assert per_dof(p, "action_scale", 4) == (2.0,) * 4
    assert per_dof(p, "action_max", 4) == (1.0, 1.0, 1.0, 0.5)
    with pytest.raises(ParamError, match="action_max"):
        per_dof(p, "action_max", 7)


def test_params_file_unknown_keys_and_sections(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("/**/policy_node:\n  ros__parameters:\n    control_rate_hz: 10.0\n    contrl_rate: 5\n")
    with pytest.raises(ParamError, match="contrl_rate") as info:
        read_params_file(bad)
    assert info.value.name == "contrl_rate"
    bad.write_text("/**:\n  ros__parameters:\n    use_sim_time: true\n    control_rate_hz: 3.0\n")
    with pytest.raises(ParamError, match="control_rate_hz"):
        read_params_file(bad)
    bad.write_text("camera_node:\n  ros__parameters:\n    x: 1\n")
    with pytest.raises(ParamError, match="camera_node"):
        read_params_file(bad)
    bad.write_text("/robot1/policy_node:\n  ros__parameters:\n    output_mode: ee\n    execute_steps: 0\n")
    with pytest.raises(ParamError, match="execute_steps"):
        read_params_file(bad)
    bad.write_text("/**/sim_bridge:\n  ros__parameters:\n    nested:\n      key: 1\n")
    with pytest.raises(ParamError, match=r"nested\.key"):
        read_params_file(bad)
