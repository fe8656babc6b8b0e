"""Real nodes in real processes over DDS: the lockstep sim loop through `daptq launch`, bad
inputs that must never reach the robot, and a node that cannot load its model."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from test_ros_support import INSTRUCTION, REPO, Probe, build_artifact, diag_values, ros_env, start_node, stop

POLICY = "daptq_ros.nodes.policy_node"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return build_artifact(tmp_path_factory.mktemp("ros") / "art")


@pytest.fixture
def domain(monkeypatch):
    env = ros_env()
    return int(env["ROS_DOMAIN_ID"]), env


def _policy_diags(probe):
    return [m for m in probe.msgs["/diagnostics"] if m.status and m.status[0].name.startswith("policy_node")]


def _diag(probe, cond):
    """Predicate: the latest policy_node diagnostics satisfy ``cond(values, status)``."""
    def check():
        msgs = _policy_diags(probe)
        return bool(msgs) and cond(diag_values(msgs[-1]), msgs[-1].status[0])
    return check


def test_launch_sim_episode_over_dds(artifact, domain, tmp_path):
    """`daptq launch policy --sim`: policy_node + sim_bridge processes finish an episode; the
    result arrives on ~/episode_result and the policy reports on /diagnostics."""
    domain_id, env = domain
    probe = Probe(domain_id)
    try:
        probe.subscribe("/t1/sim_bridge/episode_result", String, latched=True)
        probe.subscribe("/diagnostics", DiagnosticArray)
        probe.subscribe("/t1/joint_command", JointState)
        out = tmp_path / "launch.json"
        proc = subprocess.run(
            [sys.executable, "-m", "daptq_ros.cli", "launch", "policy", "--sim", "--artifact", str(artifact),
             "--namespace", "t1", "--max-steps", "15", "--episodes", "1", "--timeout", "150",
             "--set", "sim_bridge:min_result_subscribers:=1",  # the probe: no race with discovery
             "--json", str(out)],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["exit_codes"] == {"sim_bridge": 0, "policy_node": 0} and not report["crashed"]
        (episode,) = report["episodes"]
        assert episode["task"] == "reach-v3" and episode["seed"] == 100000
        assert 1 <= episode["steps"] <= 15 and episode["missed_steps"] == 0
        assert episode["mean_loop_latency_ms"] > 0
        assert report["summary"]["episodes"] == 1
        assert "reach-v3" in proc.stdout and "total: " in proc.stdout
        got = probe.wait_for(lambda: len(probe.msgs["/t1/sim_bridge/episode_result"]) >= 2, 10)
        assert got, ({k: len(v) for k, v in probe.msgs.items()}, proc.stderr[-1500:])
        records = [json.loads(m.data) for m in probe.msgs["/t1/sim_bridge/episode_result"]]
        assert [r["type"] for r in records] == ["episode", "summary"]
        assert records[0]["steps"] == episode["steps"]
        commands = probe.msgs["/t1/joint_command"]
        assert commands  # the probe joins discovery late: it sees a suffix of the episode
        assert all(list(c.name) == ["dx", "dy", "dz", "gripper"] for c in commands)
        assert all(np.all(np.abs(c.position) <= 1.0) for c in commands)
        diags = [diag_values(m) for m in _policy_diags(probe)]
        assert diags and diags[-1]["provider"] == "CPUExecutionProvider"
        assert max(int(d["commands"]) for d in diags) >= 1
    finally:
        probe.close()


def _image(stamp, width=128, height=128, encoding="rgb8", data=None):
    img = Image(height=height, width=width, encoding=encoding, step=width * 3)
    img.header.stamp = stamp
    img.data = data if data is not None else np.full(height * width * 3, 120, np.uint8).tobytes()
    return img


def _state():
    return JointState(name=["hand_x", "hand_y", "hand_z", "gripper_opening"], position=[0.0, 0.6, 0.2, 1.0])


def test_bad_inputs_never_command_and_are_reported(artifact, domain, tmp_path):
    domain_id, env = domain
    node = start_node(POLICY, ["-p", f"artifact_dir:={artifact}", "-p", "image_encoding:=rgb8",
                               "-p", "image_width:=128", "-p", "image_height:=128",
                               "-p", "stale_input_timeout_s:=5.0", "-p", "diagnostics_period_s:=0.2",
                               "-p", "image_qos_depth:=20"],  # no drops: every bad frame is seen
                      env, tmp_path / "policy.log")
    probe = Probe(domain_id)
    try:
        probe.subscribe("/policy_node/joint_command", JointState)
        probe.subscribe("/diagnostics", DiagnosticArray)
        img_pub = probe.publisher("/policy_node/image", Image)
        ins_pub = probe.publisher("/policy_node/instruction", String)
        st_pub = probe.publisher("/policy_node/joint_states", JointState)
        assert probe.wait_for(lambda: img_pub.get_subscription_count() and ins_pub.get_subscription_count()
                              and st_pub.get_subscription_count()
                              and probe.node.count_publishers("/policy_node/joint_command"), 60), \
            (tmp_path / "policy.log").read_text()
        valid = String(data=INSTRUCTION)
        bad_instr = [String(data=""), String(data="   "), String(data="x" * 5000), String(data="a\x07b")]
        non_utf8 = b"\x00\x01\x00\x00\x05\x00\x00\x00\xff\xfeab\x00"
        stamp = probe.node.get_clock().now().to_msg()
        bad_images = [
            _image(stamp, encoding="yuv422"),               # unsupported encoding
            _image(stamp, encoding="bgr8"),                 # not the expected rgb8
            _image(stamp, width=64, height=64),             # wrong size
            _image(stamp, data=b"\x00" * 1000),             # truncated data
            _image(stamp, width=100000, height=100000, data=b"\x00" * 10),  # huge
        ]
        for msg in bad_instr:
            ins_pub.publish(msg)
        ins_pub.publish(non_utf8)
        ins_pub.publish(valid)

        def bad_counts(v, status):
            return int(v["bad_images"]) >= 2 * (len(bad_images) + 1) and int(v["bad_instructions"]) >= 5

        deadline = time.monotonic() + 30
        while not _diag(probe, bad_counts)() and time.monotonic() < deadline:
            st_pub.publish(_state())
            for msg in bad_images:
                img_pub.publish(msg)
            img_pub.publish(b"\x00\x01\x00\x00\xff\xff")  # malformed CDR
            probe.wait_for(lambda: False, 0.1)
        assert _diag(probe, bad_counts)(), (tmp_path / "policy.log").read_text()[-3000:]
        assert not probe.msgs["/policy_node/joint_command"], "a command was published on bad input"
        latest = diag_values(_policy_diags(probe)[-1])  # the node's own count, independent of DDS
        assert latest["commands"] == "0" and latest["fault_commands"] == "0", latest
        warn = [m.status[0] for m in probe.msgs["/diagnostics"] if m.status[0].level == DiagnosticStatus.WARN]
        assert any("bad_images" in s.message for s in warn)
        log = (tmp_path / "policy.log").read_text()
        assert "not valid UTF-8" in log and "is empty" in log and "max_instruction_bytes" in log
        assert "truncated" in log and "yuv422" in log and "64x64" in log
        assert node.poll() is None
        # the same node still works: one valid image -> one command stamped with it
        good_stamp = probe.node.get_clock().now().to_msg()
        st_pub.publish(_state())
        img_pub.publish(_image(good_stamp))
        assert probe.wait_for(lambda: probe.msgs["/policy_node/joint_command"], 20), log[-3000:]
        cmd = probe.msgs["/policy_node/joint_command"][0]
        assert (cmd.header.stamp.sec, cmd.header.stamp.nanosec) == (good_stamp.sec, good_stamp.nanosec)
        assert cmd.header.frame_id == "base_link" and list(cmd.name) == ["dx", "dy", "dz", "gripper"]
        assert np.all(np.isfinite(cmd.position)) and np.all(np.abs(cmd.position) <= 1.0)
    finally:
        probe.close()
        assert stop(node) == 0


@pytest.mark.parametrize("case", ["missing_artifact", "unknown_param", "out_of_range"])
def test_config_errors_keep_node_up_and_report(artifact, domain, tmp_path, case):
    domain_id, env = domain
    if case == "missing_artifact":
        args, expect = ["-p", f"artifact_dir:={tmp_path / 'nope'}"], "artifact_dir"
    elif case == "out_of_range":
        args, expect = ["-p", f"artifact_dir:={artifact}", "-p", "control_rate_hz:=5000.0"], "control_rate_hz"
    else:
        params = tmp_path / "p.yaml"
        params.write_text(f"/**/policy_node:\n  ros__parameters:\n    artifact_dir: {artifact}\n"
                          "    control_rate: 5.0\n")
        args, expect = ["--params-file", str(params)], "control_rate"
    node = start_node(POLICY, [*args, "-p", "diagnostics_period_s:=0.2"], env, tmp_path / "policy.log")
    probe = Probe(domain_id)
    try:
        probe.subscribe("/diagnostics", DiagnosticArray)
        ok = probe.wait_for(_diag(probe, lambda v, s: s.level == DiagnosticStatus.ERROR), 60)
        assert ok, (tmp_path / "policy.log").read_text()[-2000:]
        errors = [m.status[0] for m in _policy_diags(probe) if m.status[0].level == DiagnosticStatus.ERROR]
        status = errors[-1]
        assert f"parameter '{expect}'" in status.message
        assert diag_values(probe.msgs["/diagnostics"][-1])["state"] == "unconfigured"
        # still alive and still reporting, with no command publisher
        n = len(probe.msgs["/diagnostics"])
        assert probe.wait_for(lambda: len(probe.msgs["/diagnostics"]) >= n + 2, 10)
        assert node.poll() is None
        assert probe.node.count_publishers("/policy_node/joint_command") == 0
    finally:
        probe.close()
        assert stop(node) == 0


@pytest.mark.parametrize("case", ["corrupt_onnx", "manifest_mismatch"])
def test_bad_artifact_keeps_node_up_and_reports(artifact, domain, tmp_path, case):
    """A corrupt model file or a manifest that does not match the graph: ERROR on /diagnostics,
    node alive, no command publisher."""
    import shutil

    domain_id, env = domain
    bad = shutil.copytree(artifact, tmp_path / "bad_artifact")
    if case == "corrupt_onnx":
        data = bytearray((bad / "model.onnx").read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
        (bad / "model.onnx").write_bytes(bytes(data))
    else:
        manifest = json.loads((bad / "manifest.json").read_text())
        manifest["inputs"][0]["name"] = "renamed_input"
        (bad / "manifest.json").write_text(json.dumps(manifest))
    node = start_node(POLICY, ["-p", f"artifact_dir:={bad}", "-p", "diagnostics_period_s:=0.2"], env,
                      tmp_path / "policy.log")
    probe = Probe(domain_id)
    try:
        probe.subscribe("/diagnostics", DiagnosticArray)
        ok = probe.wait_for(_diag(probe, lambda v, s: s.level == DiagnosticStatus.ERROR), 60)
        assert ok, (tmp_path / "policy.log").read_text()[-2000:]
        errors = [m.status[0] for m in _policy_diags(probe) if m.status[0].level == DiagnosticStatus.ERROR]
        status = errors[-1]
        assert ("checksum" in status.message or "sha256" in status.message) if case == "corrupt_onnx" \
            else "renamed_input" in status.message, status.message
        n = len(probe.msgs["/diagnostics"])
        assert probe.wait_for(lambda: len(probe.msgs["/diagnostics"]) >= n + 2, 10)
        assert node.poll() is None
        assert probe.node.count_publishers("/policy_node/joint_command") == 0
    finally:
        probe.close()
        assert stop(node) == 0


def test_nan_model_never_commands(domain, tmp_path):
    """A model that outputs NaN: every step is counted as non-finite, nothing is published."""
    from test_ros_support import build_nan_artifact

    domain_id, env = domain
    nan_artifact = build_nan_artifact(tmp_path / "nan")
    args = ["-p", f"artifact_dir:={nan_artifact}", "-p", "diagnostics_period_s:=0.2",
            "-p", "image_width:=128", "-p", "image_height:=128"]
    node = start_node(POLICY, args, env, tmp_path / "policy.log")
    probe = Probe(domain_id)
    try:
        probe.subscribe("/policy_node/joint_command", JointState)
        probe.subscribe("/diagnostics", DiagnosticArray)
        img_pub = probe.publisher("/policy_node/image", Image)
        ins_pub = probe.publisher("/policy_node/instruction", String)
        st_pub = probe.publisher("/policy_node/joint_states", JointState)
        assert probe.wait_for(lambda: img_pub.get_subscription_count()
                              and ins_pub.get_subscription_count(), 60)
        ins_pub.publish(String(data=INSTRUCTION))
        deadline = time.monotonic() + 30
        left = JointState(name=["hand_x", "hand_y", "hand_z", "gripper_opening"],
                          position=[-0.2, 0.6, 0.2, 1.0])  # hand_x < 0: this model returns NaN
        nonfinite = _diag(probe, lambda v, s: int(v["nonfinite_events"]) >= 3)
        while not nonfinite() and time.monotonic() < deadline:
            st_pub.publish(left)
            img_pub.publish(_image(probe.node.get_clock().now().to_msg()))
            probe.wait_for(lambda: False, 0.1)
        assert nonfinite(), \
            (tmp_path / "policy.log").read_text()[-2000:]
        assert not probe.msgs["/policy_node/joint_command"], "a command was published from a NaN model"
        assert node.poll() is None
    finally:
        probe.close()
        assert stop(node) == 0
