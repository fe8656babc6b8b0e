"""Lifecycle of policy_node in a real process (autostart off): unconfigured -> configure (model
loaded, nothing published) -> activate (commands flow) -> deactivate; end-effector output mode
with gripper and debug chunk topics."""

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import TwistStamped
from lifecycle_msgs.msg import Transition
from lifecycle_msgs.srv import ChangeState, GetState
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import Float32MultiArray, Float64
from test_ros_support import INSTRUCTION, Probe, build_artifact, diag_values, ros_env, start_node, stop


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("lc") / "art")


def _call(probe, client, request, timeout=20.0):
    assert client.wait_for_service(timeout_sec=60), client.srv_name
    future = client.call_async(request)
    assert probe.wait_for(future.done, timeout), f"{client.srv_name} did not answer"
    return future.result()


def _state_label(probe, client):
    return _call(probe, client, GetState.Request()).current_state.label


def _inputs(probe, pubs):
    img = Image(height=96, width=96, encoding="bgr8", step=96 * 3, data=bytes(96 * 96 * 3))
    img.header.stamp = probe.node.get_clock().now().to_msg()
    pubs["joint_states"].publish(JointState(name=["hand_x", "hand_y", "hand_z", "gripper_opening"],
                                            position=[0.0, 0.6, 0.2, 1.0]))
    pubs["image"].publish(img)
    return img.header.stamp


def test_lifecycle_transitions_and_ee_output(artifact, tmp_path):
    env = ros_env()
    node = start_node("daptq_ros.nodes.policy_node", [
        "-p", f"artifact_dir:={artifact}", "-p", "autostart:=false", "-p", "output_mode:=ee",
        "-p", "ee_msg_type:=twist", "-p", "publish_debug:=true", "-p", "trigger:=image",
        "-p", f"default_instruction:={INSTRUCTION}", "-p", "frame_id:=tool0",
        "-p", "diagnostics_period_s:=0.2", "-p", "action_scale:=[0.5]"], env, tmp_path / "policy.log")
    probe = Probe(int(env["ROS_DOMAIN_ID"]))
    try:
        for topic, mtype in (("/policy_node/ee_command", TwistStamped),
                             ("/policy_node/gripper_command", Float64),
                             ("/policy_node/debug/action_chunk", Float32MultiArray),
                             ("/diagnostics", DiagnosticArray)):
            probe.subscribe(topic, mtype)
        pubs = {"image": probe.publisher("/policy_node/image", Image),
                "joint_states": probe.publisher("/policy_node/joint_states", JointState)}
        get_state = probe.node.create_client(GetState, "/policy_node/get_state")
        change = probe.node.create_client(ChangeState, "/policy_node/change_state")
        assert _state_label(probe, get_state) == "unconfigured"
        assert pubs["image"].get_subscription_count() == 0  # nothing subscribed before configure

        req = ChangeState.Request()
        req.transition.id = Transition.TRANSITION_CONFIGURE
        assert _call(probe, change, req).success
        assert _state_label(probe, get_state) == "inactive"
        assert probe.wait_for(lambda: pubs["image"].get_subscription_count() > 0, 30)
        _inputs(probe, pubs)
        n = len(probe.msgs["/diagnostics"])
        assert probe.wait_for(lambda: len(probe.msgs["/diagnostics"]) >= n + 3, 10)
        values = diag_values(probe.msgs["/diagnostics"][-1])
        assert values["state"] == "inactive" and values["commands"] == "0"
        assert not probe.msgs["/policy_node/ee_command"]

        req.transition.id = Transition.TRANSITION_ACTIVATE
        assert _call(probe, change, req).success
        assert _state_label(probe, get_state) == "active"
        sent = []
        for _ in range(20):  # the first pair may race the publishers' activation: resend on no reply
            stamp = _inputs(probe, pubs)
            sent.append((stamp.sec, stamp.nanosec))
            if probe.wait_for(lambda: probe.msgs["/policy_node/ee_command"], 1.0):
                break
        twist = probe.msgs["/policy_node/ee_command"][-1]
        assert twist.header.frame_id == "tool0"
        assert (twist.header.stamp.sec, twist.header.stamp.nanosec) in sent  # stamped with its input
        lin = np.array([twist.twist.linear.x, twist.twist.linear.y, twist.twist.linear.z])
        assert np.all(np.abs(lin) <= 0.5 + 1e-6)  # tanh head scaled by 0.5, limited to [-1, 1]
        assert probe.wait_for(lambda: probe.msgs["/policy_node/gripper_command"]
                              and probe.msgs["/policy_node/debug/action_chunk"], 10)
        chunk = probe.msgs["/policy_node/debug/action_chunk"][-1]
        assert [d.size for d in chunk.layout.dim] == [8, 4] and len(chunk.data) == 32
        assert abs(probe.msgs["/policy_node/gripper_command"][-1].data) <= 0.5 + 1e-6

        req.transition.id = Transition.TRANSITION_DEACTIVATE
        assert _call(probe, change, req).success
        assert _state_label(probe, get_state) == "inactive"
        assert node.poll() is None
    finally:
        probe.close()
        assert stop(node) == 0
