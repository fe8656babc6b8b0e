"""Live recording: a test publisher process → recorder → bag read back (needs the rclpy wheels)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("rclpy")

from daptq_ros.drift.bag_io import BagFrames, BagTopics

TOPICS = BagTopics(
    image="/rec_test/image",
    instruction="/rec_test/instruction",
    joint_states="/rec_test/joint_states",
    commands=["/rec_test/joint_command"],
)

PUBLISHER = textwrap.dedent(
    """
    import time, rclpy
    from rclpy.qos import QoSProfile, DurabilityPolicy, ReliabilityPolicy
    from sensor_msgs.msg import Image, JointState
    from std_msgs.msg import String
    rclpy.init()
    node = rclpy.create_node("rec_test_pub")
    latched = QoSProfile(depth=5, durability=DurabilityPolicy.TRANSIENT_LOCAL,
                         reliability=ReliabilityPolicy.RELIABLE)
    instr = node.create_publisher(String, "/rec_test/instruction", latched)
    image = node.create_publisher(Image, "/rec_test/image", 10)
    state = node.create_publisher(JointState, "/rec_test/joint_states", 10)
    cmd = node.create_publisher(JointState, "/rec_test/joint_command", 10)
    instr.publish(String(data="reach the red goal position"))  # before any recorder exists
    k = 0
    while rclpy.ok():
        stamp = node.get_clock().now().to_msg()
        msg = Image(height=4, width=4, encoding="bgr8", step=12, data=bytes([k % 256, 0, 255] * 16))
        msg.header.stamp = stamp
        names = ["hand_x", "hand_y", "hand_z", "gripper_opening"]
        js = JointState(name=names, position=[k * 1e-3, 0.6, 0.2, 1.0])
        js.header.stamp = stamp
        state.publish(js)
        image.publish(msg)
        cmd.publish(JointState(name=["dx", "dy", "dz", "gripper"], position=[0.1, 0.0, -0.1, 1.0]))
        k += 1
        time.sleep(0.05)
    """
)


@pytest.fixture
def ros_env(monkeypatch):
    monkeypatch.setenv("ROS_DOMAIN_ID", str(150 + os.getpid() % 60))
    monkeypatch.setenv("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    return dict(os.environ)


@pytest.fixture
def publisher(ros_env, tmp_path):
    script = tmp_path / "pub.py"
    script.write_text(PUBLISHER)
    proc = subprocess.Popen([sys.executable, str(script)], env=ros_env)
    yield proc
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_record_and_read_back(publisher, tmp_path, storage):
    from daptq_ros.nodes.recorder import RecordOptions, record

    out = tmp_path / "bag"
    summary = record(
        RecordOptions(
            out=out, topics=TOPICS.all_topics(), storage=storage, duration_s=1.5, discovery_timeout_s=20.0
        )
    )
    assert summary["messages"]["/rec_test/instruction"] == 1  # latched, published before recording
    assert summary["messages"]["/rec_test/image"] >= 5
    assert summary["types"]["/rec_test/joint_command"] == "sensor_msgs/msg/JointState"
    frames = list(BagFrames(out, TOPICS))
    assert len(frames) >= 5
    assert {f.instruction for f in frames} == {"reach the red goal position"}
    np.testing.assert_array_equal(frames[0].image[0, 0], [255, 0, frames[0].image[0, 0, 2]])  # bgr8 → rgb
    # Each topic's subscription matches on its own, and the recording may stop between an image and
    # its command, so frames may lack a command at the start or the end, never in the middle.
    has_command = [f.command is not None for f in frames]
    first, last = has_command.index(True), len(has_command) - 1 - has_command[::-1].index(True)
    assert all(has_command[first : last + 1]), has_command
    assert last - first + 1 >= len(frames) // 2, has_command
    commands = [f.command for f in frames if f.command is not None]
    np.testing.assert_allclose(commands[-1], [0.1, 0.0, -0.1, 1.0], atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag", "pub.py"]
    # The publishers' QoS is in the metadata (ros2 bag play re-latches the instruction).
    from rosbags.interfaces import QosDurability
    from rosbags.rosbag2 import Reader

    with Reader(out) as reader:
        qos = {c.topic: c.ext.offered_qos_profiles for c in reader.connections}
    assert [q.durability for q in qos[TOPICS.instruction]] == [QosDurability.TRANSIENT_LOCAL]
    assert [q.durability for q in qos[TOPICS.image]] == [QosDurability.VOLATILE]


def test_record_errors_leave_nothing(ros_env, tmp_path):
    from daptq_ros.nodes.recorder import RecordError, RecordOptions, record

    with pytest.raises(RecordError, match=r"not seen on the graph.*--types"):
        record(RecordOptions(out=tmp_path / "a", topics=["/rec_test/nobody"], discovery_timeout_s=0.2))
    with pytest.raises(RecordError, match="no messages received"):
        record(
            RecordOptions(
                out=tmp_path / "b",
                topics=["/rec_test/nobody"],
                duration_s=0.3,
                types={"/rec_test/nobody": "std_msgs/msg/String"},
            )
        )
    with pytest.raises(RecordError, match="fully qualified"):
        RecordOptions(out=tmp_path / "c", topics=["relative"])
    assert list(tmp_path.iterdir()) == []


def test_sigint_finalizes_the_bag(publisher, ros_env, tmp_path):
    out = tmp_path / "bag"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "daptq_ros.cli",
            "record",
            "--out",
            str(out),
            "--topics",
            TOPICS.image,
            TOPICS.instruction,
            "--discovery-timeout",
            "20",
            "--ros-args",
            "-p",
            "use_sim_time:=false",
        ],
        env=ros_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    partial = []
    while time.monotonic() < deadline and not partial:
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(".bag.partial-")]
        time.sleep(0.1)
    assert partial, "recorder never started writing"
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert '"interrupted": true' in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bag", "pub.py"]
    from rosbags.rosbag2 import Reader

    with Reader(out) as reader:
        counts = {c.topic: c.msgcount for c in reader.connections}
    assert counts[TOPICS.image] >= 3 and counts[TOPICS.instruction] == 1
