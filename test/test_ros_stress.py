"""Slow robustness runs of policy_node in a real process (``pytest -m slow``):

- fuzz: >= 2,000 malformed image / instruction / joint_states messages; the node stays up,
  counts them, publishes no command, and still works afterwards;
- load: 60 s of 128x128 rgb8 images + joint states at 30 Hz with a 30 Hz control loop; reports
  achieved rate, latencies and drops (printed, asserted against loose floors).
"""

import json
import os
import time

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from sensor_msgs.msg import Image, JointState
from std_msgs.msg import String
from test_ros_support import INSTRUCTION, Probe, build_artifact, diag_values, ros_env, start_node, stop

POLICY = "daptq_ros.nodes.policy_node"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny exported model, or DAPTQ_STRESS_ARTIFACT (e.g. the demo's quantized reference
    artifact, with DAPTQ_STRESS_INSTRUCTION one of its instructions) to measure a real policy."""
    if os.environ.get("DAPTQ_STRESS_ARTIFACT"):
        return os.environ["DAPTQ_STRESS_ARTIFACT"]
    return build_artifact(tmp_path_factory.mktemp("stress") / "art")


LOAD_INSTRUCTION = os.environ.get("DAPTQ_STRESS_INSTRUCTION", INSTRUCTION)


def _latest(probe):
    msgs = [m for m in probe.msgs["/diagnostics"] if m.status and m.status[0].name.startswith("policy_node")]
    return diag_values(msgs[-1]) if msgs else {}


def _setup(artifact, tmp_path, extra):
    env = ros_env()
    node = start_node(POLICY, ["-p", f"artifact_dir:={artifact}", "-p", "diagnostics_period_s:=0.5", *extra],
                      env, tmp_path / "policy.log")
    probe = Probe(int(env["ROS_DOMAIN_ID"]))
    probe.subscribe("/policy_node/joint_command", JointState)
    probe.subscribe("/diagnostics", DiagnosticArray)
    pubs = {name: probe.publisher(f"/policy_node/{name}", t)
            for name, t in (("image", Image), ("instruction", String), ("joint_states", JointState))}
    assert probe.wait_for(lambda: all(p.get_subscription_count() for p in pubs.values()), 60), \
        (tmp_path / "policy.log").read_text()
    return node, probe, pubs


def _state(rng=None):
    pos = [0.0, 0.6, 0.2, 1.0] if rng is None else rng.normal(size=4).tolist()
    return JointState(name=["hand_x", "hand_y", "hand_z", "gripper_opening"], position=pos)


def _random_image(rng, stamp):
    """A random Image that is invalid by construction (bad encoding, zero size or truncated)."""
    enc = str(rng.choice(["rgb8", "bgr8", "mono8", "rgba8", "16UC1", "yuv422", "", "rgb8\x00x", "jpeg"]))
    w, h = int(rng.integers(0, 300)), int(rng.integers(0, 300))
    step = int(rng.integers(0, 4 * max(w, 1)))
    n = int(rng.integers(0, max(h * step, 1)))  # always shorter than height * step
    img = Image(height=h, width=w, encoding=enc, step=step, is_bigendian=int(rng.integers(0, 2)))
    img.header.stamp = stamp
    img.data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
    return img


def _random_bytes(rng):
    """Random bytes, mostly behind a valid CDR header (may or may not deserialize)."""
    head = b"\x00\x01\x00\x00" if rng.random() < 0.7 else b""
    return head + rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()


def test_fuzz_malformed_messages(artifact, tmp_path):
    n_total = int(os.environ.get("DAPTQ_FUZZ_N", "2400"))
    node, probe, pubs = _setup(artifact, tmp_path, ["-p", "image_qos_depth:=50", "-p",
                                                    "diagnostics_period_s:=0.1"])
    rng = np.random.default_rng(1)
    sent = {"image": 0, "instruction": 0, "joint_states": 0}
    t0 = time.monotonic()
    try:
        for i in range(n_total):
            kind = ("image", "instruction", "joint_states")[i % 3]
            pub = pubs[kind]
            if kind != "instruction" and rng.random() < 0.3:
                pub.publish(_random_bytes(rng))  # malformed CDR
            elif kind == "image":
                pub.publish(_random_image(rng, probe.node.get_clock().now().to_msg()))
            elif kind == "instruction":
                choice = rng.integers(0, 4)
                if choice == 3:  # CDR length field beyond the payload
                    pub.publish(b"\x00\x01\x00\x00\xff\x00\x00\x00" + _random_bytes(rng))
                elif choice == 0:
                    size = int(rng.integers(1, 40))
                    body = rng.integers(128, 256, size, dtype=np.uint8).tobytes() + b"\x00"
                    pub.publish(b"\x00\x01\x00\x00" + len(body).to_bytes(4, "little") + body)
                elif choice == 1:
                    long_text = "x" * int(rng.integers(1025, 9000))
                    pub.publish(String(data="" if rng.random() < 0.5 else long_text))
                else:  # random text with a control character: always rejected
                    text = "".join(chr(int(c)) for c in rng.integers(32, 0x2FFF, 30))
                    pub.publish(String(data=text[:15] + chr(int(rng.integers(1, 32))) + text[15:]))
            else:
                bad_state = JointState(name=["a"], position=[1.0, 2.0])
                pub.publish(_state(rng) if rng.random() < 0.5 else bad_state)
            sent[kind] += 1
            if i % 30 == 29:  # let the node drain (event: its diagnostics advance), no fixed sleep
                n = len(probe.msgs["/diagnostics"])
                probe.wait_for(lambda n=n: len(probe.msgs["/diagnostics"]) > n, 5)
        assert probe.wait_for(lambda: sum(int(_latest(probe).get(k, 0)) for k in
                                          ("bad_images", "bad_instructions", "bad_states",
                                           "unknown_instructions")) >= 0.3 * n_total, 30)
        assert node.poll() is None
        assert not probe.msgs["/policy_node/joint_command"]
        fuzz = _latest(probe)
        # still healthy: a valid instruction + state + image yields one command
        pubs["instruction"].publish(String(data=INSTRUCTION))
        pubs["joint_states"].publish(_state())
        img = Image(height=128, width=128, encoding="rgb8", step=384, data=bytes(128 * 128 * 3))
        img.header.stamp = probe.node.get_clock().now().to_msg()
        ok = probe.wait_for(lambda: probe.msgs["/policy_node/joint_command"] or
                            pubs["image"].publish(img) or False, 30)
        assert ok
        keys = ("bad_images", "bad_instructions", "bad_states", "unknown_instructions", "dropped_frames")
        print("FUZZ", json.dumps({"sent": sent, "seconds": round(time.monotonic() - t0, 1),
                                  **{k: fuzz.get(k) for k in keys}}))
    finally:
        probe.close()
        assert stop(node) == 0


@pytest.mark.parametrize("trigger", ["timer", "image"])
def test_load_30hz_60s(artifact, tmp_path, trigger):
    """timer: 30 Hz control timer sampling the latest frame (unsynchronized with the camera, so
    some frames are skipped); image: one control step per received frame."""
    duration = float(os.environ.get("DAPTQ_LOAD_S", "60"))
    node, probe, pubs = _setup(artifact, tmp_path, ["-p", "control_rate_hz:=30.0", "-p", "image_width:=128",
                                                    "-p", "image_height:=128", "-p", f"trigger:={trigger}"])
    recv: list[float] = []
    stamps: dict[int, float] = {}
    img = Image(height=128, width=128, encoding="rgb8", step=384)
    frame = np.random.default_rng(0).integers(0, 256, 128 * 128 * 3, dtype=np.uint8).tobytes()

    def publish() -> None:
        img.header.stamp = probe.node.get_clock().now().to_msg()
        img.data = frame
        stamps[img.header.stamp.sec * 10**9 + img.header.stamp.nanosec] = time.monotonic()
        pubs["joint_states"].publish(_state())
        pubs["image"].publish(img)

    def on_cmd(msg):
        key = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
        if key in stamps:
            recv.append(time.monotonic() - stamps[key])

    probe.node.create_subscription(JointState, "/policy_node/joint_command", on_cmd, 100)
    try:
        pubs["instruction"].publish(String(data=LOAD_INSTRUCTION))
        timer = probe.node.create_timer(1 / 30, publish)
        assert probe.wait_for(lambda: len(recv) > 0, 30)
        n0, t0 = len(recv), time.monotonic()
        probe.wait_for(lambda: time.monotonic() - t0 >= duration or node.poll() is not None, duration + 5)
        n1, t1 = len(recv), time.monotonic()
        probe.node.destroy_timer(timer)
        diag = _latest(probe)
        lat = np.asarray(recv[n0:n1]) * 1e3
        result = {
            "seconds": round(t1 - t0, 1), "images_published": len(stamps), "commands": n1 - n0,
            "command_rate_hz": round((n1 - n0) / (t1 - t0), 2),
            "e2e_latency_ms_p50": round(float(np.percentile(lat, 50)), 2),
            "e2e_latency_ms_p99": round(float(np.percentile(lat, 99)), 2),
            **{k: diag.get(k) for k in ("achieved_rate_hz", "inference_p50_ms", "inference_p99_ms",
                                        "loop_p50_ms", "loop_p99_ms", "dropped_frames", "overruns",
                                        "stale_events", "nonfinite_events", "clamps")},
        }
        print("LOAD", trigger, json.dumps(result))
        assert node.poll() is None
        assert result["command_rate_hz"] >= (0.75 if trigger == "timer" else 0.9) * 30, result
        assert int(diag["nonfinite_events"]) == 0
    finally:
        probe.close()
        assert stop(node) == 0
