"""Bag writing/reading round trips, frame synchronization and every bad-bag case."""

from __future__ import annotations

import numpy as np
import pytest
from test_drift_fixtures import synthetic_episodes, topics

from daptq_ros.drift.bag_io import (
    IMAGE_TYPE,
    JOINT_STATE_TYPE,
    STRING_TYPE,
    BagError,
    BagFrames,
    BagTopics,
    typestore,
)
from daptq_ros.drift.bag_writer import (
    BagWriter,
    image_msg,
    joint_state_msg,
    string_msg,
    twist_stamped_msg,
    write_episodes_bag,
)

T0 = 1_700_000_000_000_000_000
MS = 1_000_000


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_round_trip_frames(tmp_path, storage):
    eps = synthetic_episodes(3, 12)
    bag = write_episodes_bag(tmp_path / "bag", eps, topics(), storage=storage)
    frames = list(BagFrames(bag, topics()))
    assert len(frames) == 36
    assert [f.episode for f in frames] == [i // 12 for i in range(36)]
    for f in frames:
        ep, k = eps[f.episode], f.index % 12
        np.testing.assert_array_equal(f.image, ep.image[k])
        np.testing.assert_allclose(f.proprio, ep.proprio[k], rtol=1e-6)
        np.testing.assert_allclose(f.command, ep.action[k])
        assert f.instruction == ep.instruction
    assert np.all(np.diff([f.t_ns for f in frames]) > 0)
    # Nothing but the bag itself is left next to it (no partial directories).
    assert [p.name for p in tmp_path.iterdir()] == ["bag"]


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_standard_reader_uses_embedded_definitions(tmp_path, storage):
    """rosbags' own Reader, with an EMPTY typestore, decodes every message from the bag's msgdefs."""
    from rosbags.rosbag2 import Reader
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    bag = write_episodes_bag(tmp_path / "bag", synthetic_episodes(1, 3), topics(), storage=storage)
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert (bag / f"bag{suffix}").is_file() and (bag / "metadata.yaml").is_file()
    empty = get_typestore(Stores.EMPTY)
    with Reader(bag) as reader:
        for conn in reader.connections:
            assert conn.msgdef.data, f"{conn.topic} has no embedded message definition"
            empty.register(get_types_from_msg(conn.msgdef.data, conn.msgtype))
            # The embedded definition hashes to the same RIHS01 digest as the Kilted type.
            assert empty.hash_rihs01(conn.msgtype) == typestore().hash_rihs01(conn.msgtype) == conn.digest
        decoded = {}
        for conn, _, raw in reader.messages():
            decoded.setdefault(conn.msgtype, empty.deserialize_cdr(raw, conn.msgtype))
    assert decoded[IMAGE_TYPE].encoding == "rgb8" and decoded[IMAGE_TYPE].height == 16
    assert decoded[STRING_TYPE].data == synthetic_episodes(1, 3)[0].instruction
    assert list(decoded[JOINT_STATE_TYPE].name) == ["hand_x", "hand_y", "hand_z", "gripper_opening"]


def test_writer_is_atomic(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), BagWriter(tmp_path / "bag") as bag:
        bag.add_topic("/s", STRING_TYPE)
        bag.write("/s", T0, string_msg("x"))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(BagError, match="no messages"), BagWriter(tmp_path / "empty") as bag:
        bag.add_topic("/s", STRING_TYPE)
    assert list(tmp_path.iterdir()) == []
    with BagWriter(tmp_path / "ok") as bag:
        bag.add_topic("/s", STRING_TYPE)
        bag.write("/s", T0, string_msg("x"))
    with pytest.raises(BagError, match="already exists"):
        BagWriter(tmp_path / "ok")
    with pytest.raises(BagError, match="unknown message type"):
        BagWriter(tmp_path / "other").add_topic("/x", "nope_msgs/msg/Nope")


def _write(path, messages, storage="mcap"):
    """messages: (topic, msgtype, t_ns, msg)."""
    with BagWriter(path, storage) as bag:
        for topic, msgtype, _, _ in messages:
            bag.add_topic(topic, msgtype)
        for topic, _, t, msg in messages:
            bag.write(topic, t, msg)
    return path


def _frame_msgs(tp: BagTopics, n: int, start: int = T0, img_stamp=None, encoding="rgb8"):
    out = []
    rgb = np.full((4, 4, 3), 7, np.uint8)
    for k in range(n):
        t = start + k * 100 * MS
        stamp = img_stamp(k) if img_stamp else t
        msg = image_msg(stamp, rgb)
        if encoding != "rgb8":
            msg.encoding = encoding
        out.append((tp.image, IMAGE_TYPE, t, msg))
        out.append(
            (
                tp.joint_states,
                JOINT_STATE_TYPE,
                t - 2 * MS,
                joint_state_msg(t, tp.proprio_names, [k * 1e-3, 0, 0, 1]),
            )
        )
    return out


def test_sync_alignment_and_episode_rules(tmp_path):
    tp = BagTopics(commands=["/cmd"], max_sync_dt_s=0.03)
    msgs = _frame_msgs(tp, 6)
    # The instruction arrives after frame 0 (skipped) and changes (new message) before frame 3.
    msgs.append((tp.instruction, STRING_TYPE, T0 + 50 * MS, string_msg("first")))
    msgs.append((tp.instruction, STRING_TYPE, T0 + 250 * MS, string_msg("second")))
    # A command 5 ms after every image, except frame 4 (its command is too late).
    for k in range(6):
        delay = 60 if k == 4 else 5
        msgs.append(
            (
                "/cmd",
                "geometry_msgs/msg/TwistStamped",
                T0 + k * 100 * MS + delay * MS,
                twist_stamped_msg(0, [k, 0, 0], [0, 0, 1]),
            )
        )
    # A joint state far from frame 5: move frame 5's own joint state out of the sync window.
    msgs = [m for m in msgs if not (m[0] == tp.joint_states and m[2] == T0 + 500 * MS - 2 * MS)]
    bag = _write(tmp_path / "bag", msgs)
    reader = BagFrames(bag, tp)
    frames = list(reader)
    assert [f.index for f in frames] == [0, 1, 2, 3]
    assert [f.instruction for f in frames] == ["first", "first", "second", "second"]
    assert [f.episode for f in frames] == [0, 0, 1, 1]
    np.testing.assert_allclose(frames[0].command, [1, 0, 0, 0, 0, 1])
    assert frames[3].command is None  # frame 4 of the bag: command 60 ms late
    np.testing.assert_allclose(frames[1].proprio, [2e-3, 0, 0, 1], atol=1e-7)
    assert reader.skipped == {"no_instruction": 1, "no_joint_state": 1}


def test_episode_split_by_gap_and_jump(tmp_path):
    tp = BagTopics(commands=[], episode_gap_s=0.5, episode_jump=0.05)
    msgs = [(tp.instruction, STRING_TYPE, T0 - MS, string_msg("go"))]
    rgb = np.zeros((2, 2, 3), np.uint8)
    times = [0, 100, 200, 1000, 1100, 1200]  # gap of 800 ms before frame 3
    xs = [0, 0, 0, 0, 0, 0.2]  # hand jumps 20 cm at frame 5 (a reset)
    for t, x in zip(times, xs, strict=True):
        msgs.append((tp.image, IMAGE_TYPE, T0 + t * MS, image_msg(T0 + t * MS, rgb)))
        msgs.append(
            (
                tp.joint_states,
                JOINT_STATE_TYPE,
                T0 + t * MS,
                joint_state_msg(T0 + t * MS, tp.proprio_names, [x, 0, 0, 0]),
            )
        )
    frames = list(BagFrames(_write(tmp_path / "bag", msgs), tp))
    assert [f.episode for f in frames] == [0, 0, 0, 1, 1, 2]


# ------------------------------------------------------------------------------------------ bad bags
def test_missing_path_and_topics(tmp_path):
    with pytest.raises(BagError, match="does not exist"):
        BagFrames(tmp_path / "nope", topics())
    bag = write_episodes_bag(tmp_path / "bag", synthetic_episodes(1, 2), BagTopics(commands=[]))
    with pytest.raises(BagError, match=r"lacks topic\(s\) /joint_command; it has: .*/camera/image"):
        BagFrames(bag, topics())


def test_wrong_and_unknown_message_types(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    tp = BagTopics(commands=[])
    bad = tp.__class__(image="/img", instruction="/instr", joint_states="/js", commands=[])
    bag = _write(
        tmp_path / "wrong",
        [
            ("/img", STRING_TYPE, T0, string_msg("not an image")),
            ("/instr", STRING_TYPE, T0, string_msg("go")),
            ("/js", JOINT_STATE_TYPE, T0, joint_state_msg(T0, tp.proprio_names, [0, 0, 0, 0])),
        ],
    )
    with pytest.raises(
        BagError, match="topic /img has type std_msgs/msg/String, expected sensor_msgs/msg/Image"
    ):
        BagFrames(bag, bad)
    # A command topic whose type the reader cannot turn into a vector.
    bag2 = _write(
        tmp_path / "cmdtype",
        [
            *_frame_msgs(tp, 1),
            (tp.instruction, STRING_TYPE, T0 - MS, string_msg("go")),
            ("/cmd", STRING_TYPE, T0, string_msg("42")),
        ],
    )
    with pytest.raises(BagError, match="command topic /cmd has unsupported type std_msgs/msg/String"):
        BagFrames(bag2, BagTopics(commands=["/cmd"]))
    # A type no typestore knows (custom package), embedded with its own definition.
    path = tmp_path / "custom"
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection(
            "/cmd", "acme_msgs/msg/Grip", msgdef="float32 force\n", rihs01="RIHS01_" + "0" * 64
        )
        writer.write(conn, T0, b"\x00\x01\x00\x00\x00\x00\x80\x3f")
        for topic, msgtype, t, msg in [
            *_frame_msgs(tp, 1),
            (tp.instruction, STRING_TYPE, T0 - MS, string_msg("go")),
        ]:
            c = writer.add_connection(topic, msgtype, typestore=typestore())
            writer.write(c, t, typestore().serialize_cdr(msg, msgtype))
    with pytest.raises(BagError, match="acme_msgs/msg/Grip"):
        BagFrames(path, BagTopics(commands=["/cmd"]))


def test_empty_and_zero_length_bags(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = tmp_path / "nomsgs"
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        writer.add_connection("/camera/image", IMAGE_TYPE, typestore=typestore())
    with pytest.raises(BagError, match="contains no messages"):
        BagFrames(path, topics())
    bag = write_episodes_bag(tmp_path / "zero", synthetic_episodes(1, 2), topics())
    (bag / "zero.mcap").write_bytes(b"")
    with pytest.raises(BagError, match=r"cannot be opened.*empty"):
        BagFrames(bag, topics())


@pytest.mark.parametrize("storage", ["mcap", "sqlite3"])
def test_truncated_bag(tmp_path, storage):
    bag = write_episodes_bag(tmp_path / "bag", synthetic_episodes(2, 10), topics(), storage=storage)
    data_file = next(p for p in bag.iterdir() if p.suffix in (".mcap", ".db3"))
    raw = data_file.read_bytes()
    data_file.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(BagError, match="truncated or corrupt"):
        list(BagFrames(bag, topics()))


def test_wrong_image_encoding(tmp_path):
    tp = BagTopics(commands=[])
    msgs = [*_frame_msgs(tp, 3, encoding="yuv422"), (tp.instruction, STRING_TYPE, T0 - MS, string_msg("go"))]
    with pytest.raises(BagError, match=r"image 0 on /camera/image .*unsupported image encoding 'yuv422'"):
        list(BagFrames(_write(tmp_path / "bag", msgs), tp))


def test_out_of_order_timestamps(tmp_path):
    tp = BagTopics(commands=[])
    stamps = [T0, T0 + 100 * MS, T0 + 50 * MS]  # header stamps go backwards at image 2
    msgs = [
        *_frame_msgs(tp, 3, img_stamp=lambda k: stamps[k]),
        (tp.instruction, STRING_TYPE, T0 - MS, string_msg("go")),
    ]
    with pytest.raises(BagError, match="out-of-order timestamps on /camera/image: image 2"):
        list(BagFrames(_write(tmp_path / "bag", msgs), tp))


def test_no_usable_frames_and_bad_joint_states(tmp_path):
    tp = BagTopics(commands=[])
    msgs = [*_frame_msgs(tp, 2), (tp.instruction, STRING_TYPE, T0 + 10_000 * MS, string_msg("late"))]
    with pytest.raises(BagError, match="yields no frames: 2 images, 2 before the first instruction"):
        list(BagFrames(_write(tmp_path / "late", msgs), tp))
    js = [
        (tp.joint_states, JOINT_STATE_TYPE, T0, joint_state_msg(T0, ["a", "b"], [0, 0])),
        (tp.image, IMAGE_TYPE, T0, image_msg(T0, np.zeros((2, 2, 3), np.uint8))),
        (tp.instruction, STRING_TYPE, T0, string_msg("go")),
    ]
    with pytest.raises(BagError, match=r"lacks joint\(s\) \['hand_x'"):
        BagFrames(_write(tmp_path / "names", js), tp)


def test_record_cli_converts_demo_episodes(tmp_path):
    from daptq_ros.cli import main

    for i, ep in enumerate(synthetic_episodes(2, 5)):
        task_dir = tmp_path / "demos" / f"task{i}-v3"
        task_dir.mkdir(parents=True)
        np.savez_compressed(
            task_dir / f"task{i}-v3_s{i}.npz",
            image=ep.image,
            proprio=ep.proprio,
            state=np.zeros((5, 39), np.float32),
            action=ep.action,
            instruction=ep.instruction,
            task=f"task{i}-v3",
            seed=i,
            success=True,
        )
    out = tmp_path / "bag"
    assert (
        main(["record", "--out", str(out), "--from-demos", str(tmp_path / "demos"), "--storage", "sqlite3"])
        == 0
    )
    frames = list(BagFrames(out, topics()))
    assert len(frames) == 10 and [f.episode for f in frames] == [0] * 5 + [1] * 5
    assert main(["record", "--out", str(tmp_path / "x"), "--from-demos", str(tmp_path / "nothing")]) == 2
    assert not (tmp_path / "x").exists()


def test_topic_with_two_types_is_rejected(tmp_path):
    from rosbags.rosbag2 import StoragePlugin, Writer

    path = tmp_path / "two"
    store = typestore()
    with Writer(path, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        for msgtype, msg in (
            (STRING_TYPE, string_msg("a")),
            (JOINT_STATE_TYPE, joint_state_msg(T0, ["a"], [0.0])),
        ):
            conn = writer.add_connection("/instruction", msgtype, typestore=store)
            writer.write(conn, T0, store.serialize_cdr(msg, msgtype))
    with pytest.raises(BagError, match="topic /instruction has several types"):
        BagFrames(path, topics())


def test_first_image_overtaking_its_instruction_joins_the_new_episode(tmp_path):
    """Topics arrive independently: an episode's first image may be received just before its instruction."""
    tp = BagTopics(commands=[], max_sync_dt_s=0.05)
    msgs = _frame_msgs(tp, 4)
    msgs.append((tp.instruction, STRING_TYPE, T0 + 10 * MS, string_msg("first")))  # 10 ms after image 0
    msgs.append((tp.instruction, STRING_TYPE, T0 + 220 * MS, string_msg("second")))  # 20 ms after image 2
    frames = list(BagFrames(_write(tmp_path / "bag", msgs), tp))
    assert [f.instruction for f in frames] == ["first", "first", "second", "second"]
    assert [f.episode for f in frames] == [0, 0, 1, 1]
