#!/usr/bin/env python3
"""`bitvla replay` against bags written and read by an independent implementation (rosbags).

Run by scripts/test_bags.sh (which makes the venv with rosbags and Pillow): writes episodes with
rosbags in MCAP and sqlite3 (both image transports, an instruction change mid-episode, joint
states, a recorded action topic, a topic the node ignores), replays them with the release
`bitvla`, reads the outputs back with rosbags and checks schemas, types and values. Also: the
`--expect` regression check, determinism across thread counts, damaged and mistyped input, and a
valid partial output bag after Ctrl-C. Prints 'bags: N passed, M failed'.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from PIL import Image as PilImage
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "report"))
import report_page  # noqa: E402

BIN = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "bitvla"
TS = get_typestore(Stores.ROS2_JAZZY)
T = TS.types
FIRST = "pick up the black bowl and place it on the plate"
SECOND = "put the cream cheese in the bowl"
START = 1_750_000_000_000_000_000
PARAMS = """bitvla_node:
  ros__parameters:
    camera_topic: /cam/image_raw
    camera_transport: raw
    wrist_camera_topic: /wrist/image_raw/compressed
    wrist_camera_transport: compressed
    instruction_topic: /task
    proprio_source: joint_states
    joint_states_topic: /joint_states
    command_mode: ee_delta_twist
    control_rate_hz: 20.0
    dry_run: false
    command_topic: /servo_node/delta_twist_cmds
    frame_id: base_link
    gripper: libero
    gripper_topic: /gripper/command
"""


def header(t):
    return T["std_msgs/msg/Header"](
        stamp=T["builtin_interfaces/msg/Time"](sec=t // 10**9, nanosec=t % 10**9), frame_id="cam"
    )


def scene(h, w, phase):
    img = np.full((h, w, 3), 180, np.uint8)
    x = int((0.2 + 0.6 * phase) * w)
    img[h // 2 : h // 2 + 12, x : x + 12] = (200, 30, 30)
    return img


def write_episode(path, plugin, *, seconds=3.0, bad_step_at=(), camera_type=None, out_of_order=False,
                  encoding="bgr8", size=(96, 128), keep=lambda t: True, extra=None, storage_order=None):
    """A two-camera episode: raw camera (padded rows), JPEG wrist, instructions at 0 and 1.5 s."""
    h, w = size
    with Writer(path, version=9, storage_plugin=plugin) as bag:
        cam_type = camera_type or "sensor_msgs/msg/Image"
        cam = bag.add_connection("/cam/image_raw", cam_type, typestore=TS)
        wrist = bag.add_connection("/wrist/image_raw/compressed", "sensor_msgs/msg/CompressedImage", typestore=TS)
        task = bag.add_connection("/task", "std_msgs/msg/String", typestore=TS)
        joints = bag.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=TS)
        action = bag.add_connection("/expert/action", "std_msgs/msg/Float64MultiArray", typestore=TS)
        other = bag.add_connection("/other", "std_msgs/msg/Int32", typestore=TS)
        events = []
        events.append((START, task, T["std_msgs/msg/String"](data=FIRST)))
        events.append((START + 1_500_000_000, task, T["std_msgs/msg/String"](data=SECOND)))
        n = int(seconds * 10) + 1
        for i in range(n):
            t = START + 7_000_000 + i * 100_000_000
            phase = i / max(n - 1, 1)
            img = scene(h, w, phase)
            if cam_type == "std_msgs/msg/String":
                events.append((t, cam, T["std_msgs/msg/String"](data="not an image")))
            else:
                pad = 5
                rows = img[:, :, ::-1] if encoding == "bgr8" else img
                padded = np.zeros((h, w * 3 + pad), np.uint8)
                padded[:, : w * 3] = rows.reshape(h, w * 3)
                step = w * 3 + pad
                data = padded.reshape(-1)
                if i in bad_step_at:
                    data = data[: step * (h // 2)]  # shorter than height x step
                events.append((t, cam, T["sensor_msgs/msg/Image"](
                    header=header(t), height=h, width=w, encoding=encoding, is_bigendian=0,
                    step=step, data=data)))
            buf = io.BytesIO()
            PilImage.fromarray(scene(h // 2, w // 2, 1 - phase)).save(buf, format="JPEG", quality=90)
            events.append((t + 1_000_000, wrist, T["sensor_msgs/msg/CompressedImage"](
                header=header(t), format="jpeg", data=np.frombuffer(buf.getvalue(), np.uint8))))
            events.append((t + 2_000_000, joints, T["sensor_msgs/msg/JointState"](
                header=header(t), name=[f"j{k}" for k in range(8)],
                position=np.linspace(0, 1, 8) * phase, velocity=np.zeros(0), effort=np.zeros(0))))
            events.append((t + 3_000_000, other, T["std_msgs/msg/Int32"](data=i)))
        for i in range(int(seconds * 20) + 1):
            t = START + 1_000_000 + i * 50_000_000
            layout = T["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0)
            events.append((t, action, T["std_msgs/msg/Float64MultiArray"](
                layout=layout, data=np.array([0.1, 0.0, -0.1, 0.0, 0.0, 0.05, -1.0]))))
        if extra:
            events.extend(extra(bag))  # (t, connection, serialized bytes)
        events.sort(key=lambda e: e[0])
        if storage_order:
            events = storage_order(events)
        if out_of_order:
            # One camera message written 0.3 s late (its timestamp is in the past).
            k = next(i for i, e in enumerate(events) if e[1] is cam and e[0] > START + 1_000_000_000)
            ev = events.pop(k)
            events.insert(k + 12, ev)
        for t, conn, msg in events:
            if keep(t):
                bag.write(conn, t, msg if isinstance(msg, bytes) else TS.serialize_cdr(msg, conn.msgtype))
    return path


def read_bag(path):
    """{topic: [(t, msgtype, message)]}, registering types from the bag's own definitions."""
    out = {}
    store = get_typestore(Stores.ROS2_JAZZY)
    with Reader(path) as r:
        for c in r.connections:
            if c.msgtype not in store.types:
                store.register(get_types_from_msg(c.msgdef.data, c.msgtype))
        for c, t, raw in r.messages():
            out.setdefault(c.topic, []).append((t, c.msgtype, store.deserialize_cdr(raw, c.msgtype)))
        conns = {c.topic: c for c in r.connections}
    return out, conns


def bitvla(*args, check=True, timeout=600):
    p = subprocess.run([str(BIN), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"bitvla {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p


class Ctx:
    def __init__(self, tmp):
        self.tmp = Path(tmp)
        self.model = self.tmp / "tiny"
        bitvla("make-tiny", "--out", self.model)
        self.params = self.tmp / "params.yaml"
        self.params.write_text(PARAMS)
        self.mcap = write_episode(self.tmp / "ep_mcap", StoragePlugin.MCAP)
        self.sqlite = write_episode(self.tmp / "ep_sqlite", StoragePlugin.SQLITE3)
        self.n = 0

    def replay(self, bag, *extra, check=True, name=None):
        self.n += 1
        out = self.tmp / (name or f"out{self.n}")
        report = self.tmp / f"report{self.n}.json"
        p = bitvla("replay", "--bag", bag, "--model", self.model, "--params", self.params, "--out", out,
                   "--report", report, "--recorded-topic", "/expert/action", *extra, check=check)
        rep = json.loads(report.read_text()) if report.exists() else None
        return out, rep, p


def msg_dir_decodes_like_the_bag(out, conns):
    """The definitions the replay embeds for the package's messages are msg/'s (without comments),
    and a typestore
    built from msg/ alone decodes every message exactly as the bag's own definitions do."""
    sep = "\n" + "=" * 80 + "\n"
    own = get_typestore(Stores.ROS2_JAZZY)
    topics = {"/bitvla_node/action_chunk": "ActionChunk", "/bitvla_node/status": "PolicyStatus"}
    for topic, name in topics.items():
        text = (ROOT / "msg" / f"{name}.msg").read_text()
        embedded = conns[topic].msgdef.data
        fields = [line.split("#")[0].strip() for line in text.splitlines()]
        assert embedded.split(sep)[0].strip().splitlines() == [f for f in fields if f], (topic, embedded[:300])
        own.register(get_types_from_msg(text, f"bitvla_ros/msg/{name}"))
    bag_store = get_typestore(Stores.ROS2_JAZZY)
    n = 0
    with Reader(out) as r:
        for c in r.connections:
            if c.topic in topics:
                bag_store.register(get_types_from_msg(c.msgdef.data, c.msgtype))
        for c, _, raw in r.messages():
            if c.topic in topics:
                a = own.deserialize_cdr(raw, c.msgtype)
                b = bag_store.deserialize_cdr(raw, c.msgtype)
                assert repr(a) == repr(b), (c.topic, a, b)
                n += 1
    assert n > 20, n


def commands(out):
    msgs, _ = read_bag(out)
    return [(t, m.header.stamp.sec, m.header.stamp.nanosec,
             (m.twist.linear.x, m.twist.linear.y, m.twist.linear.z,
              m.twist.angular.x, m.twist.angular.y, m.twist.angular.z))
            for t, _, m in msgs["/servo_node/delta_twist_cmds"]]


def test_mcap_replay_output_reads_back_with_rosbags(c):
    out, rep, _ = c.replay(c.mcap)
    msgs, conns = read_bag(out)
    assert set(msgs) == {"/servo_node/delta_twist_cmds", "/bitvla_node/action_chunk", "/diagnostics",
                         "/gripper/command", "/bitvla_node/status"}, set(msgs)
    msg_dir_decodes_like_the_bag(out, conns)
    assert conns["/bitvla_node/status"].msgtype == "bitvla_ros/msg/PolicyStatus"
    status = [m for _, _, m in msgs["/bitvla_node/status"]]
    states = [st.state for st in status]
    # Inferring before the first chunk, then executing; one status per tick.
    assert states[0] in (2, 4) and 3 in states and len(status) == rep["ticks"], (states[:8], rep["ticks"])
    executing = [st for st in status if st.state == 3]
    assert all(st.chunk_sequence >= 1 and st.reason == "" and not st.dry_run for st in executing)
    assert status[-1].instruction == SECOND and status[-1].last_inference_latency_s > 0
    assert all(st.reason for st in status if st.state in (2, 4))
    assert conns["/gripper/command"].msgtype == "std_msgs/msg/Float64MultiArray"
    grip = msgs["/gripper/command"]
    assert all(list(m.data) in ([-1.0], [1.0]) for _, _, m in grip), grip[:3]
    # One gripper command with every real (non-hold) twist.
    assert conns["/servo_node/delta_twist_cmds"].msgtype == "geometry_msgs/msg/TwistStamped"
    assert conns["/bitvla_node/action_chunk"].msgtype == "bitvla_ros/msg/ActionChunk"
    assert conns["/diagnostics"].msgtype == "diagnostic_msgs/msg/DiagnosticArray"
    # Commands on the 20 Hz grid of bag time, stamped with their log time.
    cmds = msgs["/servo_node/delta_twist_cmds"]
    for t, _, m in cmds:
        assert t % 50_000_000 == 0, t
        assert m.header.stamp.sec * 10**9 + m.header.stamp.nanosec == t
        assert m.header.frame_id == "base_link"
    moving = [m for _, _, m in cmds if any([m.twist.linear.x, m.twist.linear.y, m.twist.angular.z])]
    assert len(moving) > 20, len(moving)
    assert len(grip) == len(moving) and {t for t, _, _ in grip} <= {t for t, _, _ in cmds}
    chunks = [m for _, _, m in msgs["/bitvla_node/action_chunk"]]
    assert chunks[0].instruction == FIRST and chunks[-1].instruction == SECOND
    assert [ch.sequence for ch in chunks] == sorted(ch.sequence for ch in chunks)
    for ch in chunks:
        dims = len(ch.dimension_names)
        assert dims == 7 and len(ch.actions) == ch.horizon * dims == len(ch.normalized)
        assert np.all(np.isfinite(ch.actions))
        # Stamped with the observation: a camera frame time (7 ms past a 100 ms boundary) or
        # the wrist's (8 ms): the oldest of the two cameras' newest frames.
        assert (ch.header.stamp.nanosec % 100_000_000) in (7_000_000, 8_000_000), ch.header.stamp
    # Report.
    assert rep["episodes"] == 2 and [i["text"] for i in rep["instructions"]] == [FIRST, SECOND]
    assert abs(rep["instructions"][1]["t_s"] - 1.5) < 1e-9
    # The last call may still be within its latency when the bag ends.
    assert rep["chunks"] > 3 and rep["chunks"] <= rep["inferences"] <= rep["chunks"] + 1, rep
    assert rep["commands"]["/servo_node/delta_twist_cmds"] == len(cmds)
    assert rep["frames_received"] == 62 and rep["frames_rejected"] == 0
    assert rep["messages_per_topic"]["/other"] == 31 and rep["messages_skipped"] >= 31
    assert rep["latency"]["p50_ms"] > 0
    cmp = rep["recorded_vs_predicted"]
    assert cmp["pairs"] > 20 and len(cmp["l1"]) == 7 and len(cmp["rmse"]) == 7
    assert all(r >= l - 1e-12 for l, r in zip(cmp["l1"], cmp["rmse"]))


def test_sqlite3_and_mcap_give_the_same_commands(c):
    a, _, _ = c.replay(c.mcap)
    b, _, _ = c.replay(c.sqlite)
    assert commands(a) == commands(b)


def test_split_bags_and_lz4_chunks_give_the_same_commands(c):
    # A split bag: two storage files listed in one metadata.yaml, as rosbag2 --max-bag-duration writes.
    half = START + 1_520_000_000
    split = write_episode(c.tmp / "split", StoragePlugin.MCAP, keep=lambda t: t < half)
    second = write_episode(c.tmp / "second", StoragePlugin.MCAP, keep=lambda t: t >= half)
    shutil.copy(second / "second.mcap", split / "split_1.mcap")
    meta = (split / "metadata.yaml").read_text()
    meta = meta.replace("relative_file_paths:\n  - split.mcap", "relative_file_paths:\n  - split.mcap\n  - split_1.mcap")
    assert "split_1.mcap" in meta
    (split / "metadata.yaml").write_text(meta)
    a, whole, _ = c.replay(c.mcap)
    b, rep, _ = c.replay(split)
    assert rep["bag_messages"] == whole["bag_messages"] > 150, (rep["bag_messages"], whole["bag_messages"])
    assert commands(a) == commands(b)
    # lz4 chunks, written by foxglove's mcap-ros2-support (a bare .mcap, no metadata.yaml).
    from mcap.writer import CompressionType
    from mcap_ros2.writer import Writer as Ros2Writer
    lz4 = c.tmp / "lz4.mcap"
    schemas = {}
    with open(lz4, "wb") as f, Reader(c.mcap) as r:
        w = Ros2Writer(f, compression=CompressionType.LZ4, chunk_size=64 * 1024)
        for conn in r.connections:
            schemas[conn.id] = w.register_msgdef(conn.msgtype, conn.msgdef.data)
        for conn, t, raw in r.messages():
            msg = TS.deserialize_cdr(raw, conn.msgtype)
            w.write_message(conn.topic, schemas[conn.id], to_dict(msg), log_time=t, publish_time=t)
        w.finish()
    with open(lz4, "rb") as f:
        from mcap.reader import make_reader
        summary = make_reader(f).get_summary()
        assert {ci.compression for ci in summary.chunk_indexes} == {"lz4"}
    d, _, _ = c.replay(lz4)
    assert commands(a) == commands(d)


def to_dict(msg):
    """A rosbags message as the plain dict mcap-ros2-support serializes."""
    if hasattr(msg, "__dataclass_fields__"):
        return {k: to_dict(getattr(msg, k)) for k in msg.__dataclass_fields__ if k != "__msgtype__"}
    if isinstance(msg, np.ndarray):
        return msg.tobytes() if msg.dtype == np.uint8 else msg.tolist()
    if isinstance(msg, list):
        return [to_dict(m) for m in msg]
    return msg


def test_deterministic_across_threads_and_expect_catches_a_change(c):
    a, _, _ = c.replay(c.mcap, "--threads", "1")
    b, rep, p = c.replay(c.mcap, "--threads", "2", "--expect", a, "--tolerance", "0")
    assert rep["expect"]["passed"] and rep["expect"]["compared"] > 40, rep["expect"]
    assert commands(a) == commands(b)
    changed = c.tmp / "changed.yaml"
    changed.write_text(PARAMS + "    position_scale_m: 0.06\n")
    n = c.n + 1
    p = bitvla("replay", "--bag", c.mcap, "--model", c.model, "--params", changed, "--out", c.tmp / "chg",
               "--expect", a, "--report", c.tmp / f"chg{n}.json", check=False)
    assert p.returncode == 1, (p.returncode, p.stderr)
    rep = json.loads((c.tmp / f"chg{n}.json").read_text())
    assert not rep["expect"]["passed"] and rep["expect"]["differences"]
    assert "differ" in p.stderr


def test_measured_latency_runs(c):
    _, rep, _ = c.replay(c.mcap, "--latency", "measured")
    assert rep["latency_model"] == "measured" and rep["chunks"] > 3


def test_package_messages_from_another_msg_version_are_reported(c):
    """A bag recorded from a live node carries bitvla_ros messages; one whose embedded definition
    differs from this build's msg/ is named in the report (not decoded), one that matches is not."""
    for plugin in (StoragePlugin.MCAP, StoragePlugin.SQLITE3):
        def extra(bag):
            events = []
            for name, topic, suffix in (("ActionChunk", "/old/action_chunk", "\nfloat64 extra_field\n"),
                                        ("PolicyStatus", "/old/status", "")):
                store = get_typestore(Stores.ROS2_JAZZY)
                msgtype = f"bitvla_ros/msg/{name}"
                store.register(get_types_from_msg((ROOT / "msg" / f"{name}.msg").read_text() + suffix, msgtype))
                conn = bag.add_connection(topic, msgtype, typestore=store)
                fields = {f: 0 for f in ("sequence", "horizon", "state", "chunk_sequence", "chunk_index",
                                         "inferences")}
                msg_cls = store.types[msgtype]
                kwargs = {}
                for f in msg_cls.__dataclass_fields__:
                    if f == "header":
                        kwargs[f] = header(START)
                    elif f in ("instruction", "unnorm_key", "reason"):
                        kwargs[f] = "x"
                    elif f == "dimension_names":
                        kwargs[f] = ["a"]
                    elif f in ("normalized", "actions"):
                        kwargs[f] = np.zeros(2, np.float32)
                    elif f == "dry_run":
                        kwargs[f] = False
                    elif f in fields:
                        kwargs[f] = 0
                    else:
                        kwargs[f] = 0.0
                events.append((START + 10_000_000, conn, bytes(store.serialize_cdr(msg_cls(**kwargs), msgtype))))
            return events
        bag = write_episode(c.tmp / f"foreign_{plugin.name}", plugin, extra=extra)
        _, rep, _ = c.replay(bag)
        foreign = [w for w in rep["warnings"] if "differs from this build's" in w]
        assert len(foreign) == 1 and "/old/action_chunk" in foreign[0] and "msg/ActionChunk.msg" in foreign[0], \
            (plugin, rep["warnings"])
        assert rep["chunks"] > 3, rep


def test_damaged_and_mistyped_input(c):
    # A truncated MCAP: replayed up to the damage, with a warning.
    src = next(Path(c.mcap).glob("*.mcap"))
    cut = c.tmp / "truncated.mcap"
    data = src.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    _, rep, p = c.replay(cut, check=False)
    assert p.returncode == 0, p.stderr
    assert any("damaged" in w for w in rep["warnings"]), rep["warnings"]
    assert 0 < rep["bag_messages"] < 300
    # Garbage where a sqlite3 file should be: a clear error, no panic.
    junk = c.tmp / "junk.db3"
    junk.write_bytes(b"this is not a database" * 100)
    _, _, p = c.replay(junk, check=False)
    assert p.returncode == 1 and "junk.db3" in p.stderr and "panicked" not in p.stderr, p.stderr
    # Not a bag at all.
    p = bitvla("replay", "--bag", c.params, "--model", c.model, check=False)
    assert p.returncode == 1 and "not a bag" in p.stderr, p.stderr
    # A frame whose data is shorter than height x step: rejected, the replay goes on.
    bad = write_episode(c.tmp / "badstep", StoragePlugin.MCAP, bad_step_at={5})
    _, rep, _ = c.replay(bad)
    assert rep["frames_rejected"] == 1 and rep["chunks"] > 3, rep
    assert any("/cam/image_raw" in w and "0.507" in w for w in rep["warnings"]), rep["warnings"]
    # The camera topic with the wrong type: its messages are skipped, the node holds.
    wrong = write_episode(c.tmp / "wrongtype", StoragePlugin.MCAP, camera_type="std_msgs/msg/String")
    _, rep, _ = c.replay(wrong)
    assert any("std_msgs/msg/String" in w for w in rep["warnings"]), rep["warnings"]
    assert rep["inferences"] == 0 and rep["holds"].get("no_camera", 0) > 0
    # A missing camera topic: a clear error naming the parameter.
    p = bitvla("replay", "--bag", c.mcap, "--model", c.model, check=False)
    assert p.returncode == 1 and "camera_topic" in p.stderr, p.stderr


def per_topic_queues(events):
    """Storage order of a recorder with per-topic queues: within each 100 ms frame, the camera,
    then the joint state (t+2 ms) before the wrist image (t+1 ms) and the rest."""
    order = {"/cam/image_raw": 0, "/joint_states": 1}
    frames = {}
    for e in events:
        frames.setdefault((e[0] - START) // 100_000_000, []).append(e)
    return [e for k in sorted(frames) for e in sorted(frames[k], key=lambda e: order.get(e[1].topic, 2))]


def test_messages_out_of_log_time_order_are_replayed_in_log_time_order(c):
    # Inside a chunk: rosbags writes 1 MiB chunks, and this episode's frames are small.
    ooo = write_episode(c.tmp / "queues", StoragePlugin.MCAP, storage_order=per_topic_queues)
    from mcap.reader import make_reader
    with open(next(Path(ooo).glob("*.mcap")), "rb") as f:
        stored = [m.log_time for _, _, m in make_reader(f).iter_messages(log_time_order=False)]
        f.seek(0)
        chunks = make_reader(f).get_summary().chunk_indexes
    # Every frame is stored out of order and rosbags writes 1 MiB chunks: all but at most one
    # inversion per chunk boundary lie inside a chunk.
    inversions = sum(b < a for a, b in zip(stored, stored[1:]))
    assert inversions > 10 * len(chunks), (inversions, len(chunks))
    a, whole, _ = c.replay(c.mcap)
    b, rep, _ = c.replay(ooo)
    assert not any("goes back" in w for w in rep["warnings"]), rep["warnings"]
    assert rep["warning_count"] == whole["warning_count"] == 0, rep["warnings"]
    assert commands(a) == commands(b)
    # One message written 0.3 s late (out of order across chunks of rosbags' writer as well).
    late = write_episode(c.tmp / "ooo_mcap", StoragePlugin.MCAP, out_of_order=True)
    d, rep, _ = c.replay(late)
    assert not any("goes back" in w for w in rep["warnings"]), rep["warnings"]
    assert commands(a) == commands(d)
    # sqlite3 stores rows in any order too; the reader orders them by timestamp.
    e, rep, _ = c.replay(write_episode(c.tmp / "ooo_db3", StoragePlugin.SQLITE3, out_of_order=True))
    assert commands(a) == commands(e)


def test_split_bag_whose_files_interleave_in_time(c):
    # Two storage files, each holding every other half second of the episode.
    first = lambda t: ((t - START) // 500_000_000) % 2 == 0
    split = write_episode(c.tmp / "inter", StoragePlugin.MCAP, keep=first)
    other = write_episode(c.tmp / "inter_b", StoragePlugin.MCAP, keep=lambda t: not first(t))
    shutil.copy(other / "inter_b.mcap", split / "inter_1.mcap")
    meta = (split / "metadata.yaml").read_text()
    (split / "metadata.yaml").write_text(
        meta.replace("relative_file_paths:\n  - inter.mcap", "relative_file_paths:\n  - inter.mcap\n  - inter_1.mcap"))
    assert "inter_1.mcap" in (split / "metadata.yaml").read_text()
    a, whole, _ = c.replay(c.mcap)
    b, rep, _ = c.replay(split)
    assert rep["bag_messages"] == whole["bag_messages"], (rep["bag_messages"], whole["bag_messages"])
    assert not any("goes back" in w for w in rep["warnings"]), rep["warnings"]
    assert commands(a) == commands(b)


def test_warnings_are_summarised_per_topic_and_kind(c):
    bad = write_episode(c.tmp / "manybad", StoragePlugin.MCAP, bad_step_at=set(range(3, 30, 2)))
    n = c.n + 1
    p = bitvla("replay", "--bag", bad, "--model", c.model, "--params", c.params, "--out", c.tmp / "mb",
               "--report", c.tmp / f"mb{n}.json")
    rep = json.loads((c.tmp / f"mb{n}.json").read_text())
    assert rep["warning_count"] == len(rep["warnings"]) == 14, rep["warnings"]
    [group] = rep["warning_summary"]
    assert group["kind"] == "rejected_frame" and group["topic"] == "/cam/image_raw" and group["count"] == 14
    assert abs(group["first_s"] - 0.3) < 0.01 and abs(group["last_s"] - 2.9) < 0.01, group
    # The terminal shows one line for the group (and logged the first one), not 14.
    out = p.stdout + p.stderr
    assert "rejected_frame on /cam/image_raw: 14 times" in out, out
    assert out.count("rejected frame:") <= 3, out
    # --json keeps every one.
    p = bitvla("replay", "--bag", bad, "--model", c.model, "--params", c.params, "--json")
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(rep["warnings"]) == 14 and rep["warning_summary"][0]["count"] == 14


def test_camera_transport_auto_takes_the_type_from_the_bag(c):
    auto = c.tmp / "auto.yaml"
    auto.write_text("\n".join(l for l in PARAMS.splitlines() if "_transport" not in l) + "\n")
    a, _, _ = c.replay(c.mcap)
    n = c.n + 1
    bitvla("replay", "--bag", c.mcap, "--model", c.model, "--params", auto, "--out", c.tmp / "auto_out",
           "--report", c.tmp / f"auto{n}.json")
    rep = json.loads((c.tmp / f"auto{n}.json").read_text())
    assert rep["camera_transports"] == {"/cam/image_raw": "raw", "/wrist/image_raw/compressed": "compressed"}, rep
    assert rep["frames_received"] == 62 and rep["holds"].get("no_camera", 0) < 3, rep
    assert commands(a) == commands(c.tmp / "auto_out")
    # sqlite3 declares types in its topics table.
    bitvla("replay", "--bag", c.sqlite, "--model", c.model, "--params", auto, "--out", c.tmp / "auto_db3",
           "--report", c.tmp / f"auto{n}_db3.json")
    rep = json.loads((c.tmp / f"auto{n}_db3.json").read_text())
    assert rep["camera_transports"]["/wrist/image_raw/compressed"] == "compressed", rep
    assert commands(a) == commands(c.tmp / "auto_db3")
    # A camera topic that is not an image: a clear error naming the parameter.
    wrong = write_episode(c.tmp / "auto_wrong", StoragePlugin.MCAP, camera_type="std_msgs/msg/String")
    p = bitvla("replay", "--bag", wrong, "--model", c.model, "--params", auto, check=False)
    assert p.returncode == 1 and "camera_transport" in p.stderr and "std_msgs/msg/String" in p.stderr, p.stderr
    assert "panicked" not in p.stderr


def test_ctrl_c_leaves_a_valid_partial_bag(c):
    long = write_episode(c.tmp / "long", StoragePlugin.MCAP, seconds=20.0)
    out = c.tmp / "partial"
    proc = subprocess.Popen([str(BIN), "replay", "--bag", str(long), "--model", str(c.model), "--params",
                             str(c.params), "--out", str(out), "--realtime"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted" in stderr, (proc.returncode, stderr)
    msgs, _ = read_bag(out)
    n = len(msgs["/servo_node/delta_twist_cmds"])
    # Real time at 20 Hz: about 4 s of commands, far fewer than the 20 s episode's 400.
    assert 20 < n < 200, n


def test_make_episode_bags_decode_with_rosbags(c):
    out = c.tmp / "made"
    bitvla("make-episode", "--out", out, "--duration-s", "1")
    msgs, conns = read_bag(out)
    assert conns["/camera/image_raw"].msgtype == "sensor_msgs/msg/Image"
    img = msgs["/camera/image_raw"][0][2]
    assert (img.height, img.width, img.encoding, img.step) == (240, 320, "rgb8", 960)
    assert len(img.data) == 240 * 960
    jpeg = msgs["/camera/wrist/image_raw/compressed"][0][2]
    assert PilImage.open(io.BytesIO(jpeg.data.tobytes())).size == (160, 120)
    assert msgs["/instruction"][0][2].data
    assert len(msgs["/expert/action"][0][2].data) == 7
    meta = (out / "metadata.yaml").read_text()
    assert "storage_identifier: mcap" in meta and "version: 9" in meta


# The renderer's marker colours (src/report/html.rs); series colours are read from the page.
CHUNK_MARK = "#B0B0B0"
INSTRUCTION_MARK = "#9467BD"


def runs(flags):
    """Number of maximal runs of True."""
    return sum(1 for i, f in enumerate(flags) if f and (i == 0 or not flags[i - 1]))


def html_replay(c, bag, *extra, params=None, name):
    """Replays with --html (and --report); returns (page, report, output bag dir, process)."""
    out, html, report = c.tmp / f"{name}_out", c.tmp / f"{name}.html", c.tmp / f"{name}.json"
    p = bitvla("replay", "--bag", bag, "--model", c.model, "--params", params or c.params, "--out", out,
               "--report", report, "--html", html, *extra)
    return report_page.parse(html), json.loads(report.read_text()), out, html


def test_html_report_draws_what_the_output_bag_holds(c):
    page, rep, out, html = html_replay(c, c.mcap, "--recorded-topic", "/expert/action", name="html")
    msgs, _ = read_bag(out)
    status = [m for _, _, m in msgs["/bitvla_node/status"]]
    executing = [st.state == 3 for st in status]
    chunk_seqs = {st.chunk_sequence for st in status if st.state == 3}
    recorded = read_bag(c.mcap)[0]["/expert/action"]
    assert sum(executing) > 20 and len(chunk_seqs) > 3
    for dim in range(7):
        chart = page["charts"][f"dim-{dim}"]
        assert chart["svg"] == 1
        action, rec = chart["series"]["action"], chart["series"]["recorded"]
        # Every executed tick is one point, every recorded message one point, broken where held.
        assert action["points"] == action["declared"] == sum(executing), (dim, action, sum(executing))
        assert 1 <= action["polylines"] <= runs(executing), (action, runs(executing))
        assert rec["points"] == rec["declared"] == len(recorded), (dim, rec, len(recorded))
        assert len(report_page.polylines_of(chart, CHUNK_MARK)) == len(chunk_seqs)
        assert len(report_page.polylines_of(chart, INSTRUCTION_MARK)) == 2
    lat = page["charts"]["latency"]["series"]["latency"]
    assert lat["points"] == lat["declared"] == len(msgs["/bitvla_node/action_chunk"])
    path = page["charts"]["ee-top"]["series"]["path"]
    assert path["points"] == len(msgs["/servo_node/delta_twist_cmds"]) == page["charts"]["ee-side"]["series"]["path"]["points"]
    # One thumbnail per camera per call, decodable, at most 160x120.
    assert page["strip_calls"] == rep["inferences"] and len(page["images"]) == 2 * rep["inferences"]
    for src in page["images"][:4]:
        assert src.startswith("data:image/jpeg;base64,")
        img = PilImage.open(io.BytesIO(__import__("base64").b64decode(src.split(",", 1)[1])))
        assert img.size[0] <= 160 and img.size[1] <= 120, img.size
    # The header: what ran, on what, and what was said.
    text = page["text"]
    for needle in (str(c.mcap), str(c.model), str(c.params), FIRST, SECOND, "/expert/action",
                   f"{rep['latency']['p50_ms']:.1f} ms"):
        assert needle in text, needle
    embedded = page["report"]
    embedded.pop("html", None)
    rep.pop("html", None)
    assert embedded == rep
    assert "no-recorded" not in page["ids"] and "no-actions" not in page["ids"]
    report_page.check_in_browser(html, c.tmp / "html.png", 2 * rep["inferences"])


def test_html_report_says_what_is_missing(c):
    # A bag with one camera, replayed without a recorded topic.
    one_cam = c.tmp / "one_cam"
    bitvla("make-episode", "--out", one_cam, "--duration-s", "2", "--no-wrist")
    params = c.tmp / "one_cam.yaml"
    params.write_text((ROOT / "config" / "replay_demo.yaml").read_text().replace(
        "wrist_camera_topic: /camera/wrist/image_raw/compressed", 'wrist_camera_topic: ""'))
    page, rep, _, html = html_replay(c, one_cam, params=params, name="one_cam")
    assert {"no-wrist", "no-recorded"} <= page["ids"], page["ids"]
    assert rep["inferences"] > 2 and len(page["images"]) == rep["inferences"]
    assert "recorded" not in page["charts"]["dim-0"]["series"]
    report_page.check_in_browser(html, c.tmp / "one_cam.png", rep["inferences"])
    # Every tick held: the instruction topic is not in the bag.
    params = c.tmp / "held.yaml"
    params.write_text(PARAMS.replace("instruction_topic: /task", "instruction_topic: /nobody"))
    page, rep, _, html = html_replay(c, c.mcap, params=params, name="held")
    assert rep["holds"] == {"no_instruction": rep["ticks"]} and rep["inferences"] == 0, rep["holds"]
    assert {"no-actions", "no-instructions", "no-latency", "no-thumbnails"} <= page["ids"], page["ids"]
    assert page["charts"]["dim-0"]["series"]["action"]["points"] == 0
    assert page["text"].count("<rect") >= 7, "each action chart shades the hold"
    report_page.check_in_browser(html, c.tmp / "held.png", 0)
    # Damaged frames: the warnings, grouped, and every one listed.
    damaged = write_episode(c.tmp / "damaged_html", StoragePlugin.MCAP, bad_step_at=(3, 5, 7))
    page, rep, _, _ = html_replay(c, damaged, name="damaged")
    assert rep["frames_rejected"] == 3 and "warnings" in page["ids"], rep["warning_summary"]
    assert "<td>rejected_frame</td><td>/cam/image_raw</td><td>3</td>" in page["text"]
    assert page["text"].count("<li>rejected frame: /cam/image_raw") == 3


def test_html_report_of_an_interrupted_replay(c):
    long = write_episode(c.tmp / "long_html", StoragePlugin.MCAP, seconds=20.0)
    out, html = c.tmp / "partial_html", c.tmp / "partial.html"
    proc = subprocess.Popen([str(BIN), "replay", "--bag", str(long), "--model", str(c.model), "--params",
                             str(c.params), "--out", str(out), "--realtime", "--html", str(html)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3.0)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "interrupted" in stderr, (proc.returncode, stderr)
    page = report_page.parse(html)
    assert "interrupted" in page["ids"] and page["report"]["interrupted"] is True
    msgs, _ = read_bag(out)
    executing = sum(1 for _, _, st in msgs["/bitvla_node/status"] if st.state == 3)
    assert 10 < executing < 300, executing
    assert page["charts"]["dim-0"]["series"]["action"]["points"] == executing
    report_page.check_in_browser(html, c.tmp / "partial.png", len(page["images"]))


def test_html_report_of_a_minute_at_20_hz_stays_small(c):
    minute = c.tmp / "minute"
    bitvla("make-episode", "--out", minute, "--duration-s", "60")
    page, rep, _, html = html_replay(c, minute, "--recorded-topic", "/expert/action",
                                     params=ROOT / "config" / "replay_demo.yaml", name="minute")
    size = html.stat().st_size
    print(f"  60 s at 20 Hz, two cameras, {rep['inferences']} calls: {size / 1e6:.2f} MB")
    assert size <= 5_000_000, size
    # Every call keeps its thumbnails (at most one per camera per call).
    assert rep["ticks"] >= 1199 and page["strip_calls"] == rep["inferences"] > 100
    assert page["charts"]["dim-0"]["series"]["recorded"]["points"] == rep["messages_per_topic"]["/expert/action"]


def test_demo_writes_its_html_report(c):
    cwd = c.tmp / "demo_cwd"
    cwd.mkdir()
    p = subprocess.run([str(BIN), "demo"], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "HTML report: bitvla-demo-report.html" in p.stdout, p.stdout
    # Without --out there is no output bag, and no path to a deleted one is printed.
    assert "output bag" not in p.stdout, p.stdout
    html = cwd / "bitvla-demo-report.html"
    page = report_page.parse(html)
    rep = page["report"]
    assert rep["inferences"] > 5 and len(page["images"]) == 2 * rep["inferences"]
    assert page["charts"]["dim-6"]["series"]["recorded"]["points"] == rep["messages_per_topic"]["/expert/action"]
    report_page.check_in_browser(html, c.tmp / "demo.png", 2 * rep["inferences"])


def test_the_browser_check_catches_a_broken_page(c):
    if report_page.chromium() is None:
        report_page.check_in_browser(None, None, 0)  # fails under BITVLA_REQUIRE_BROWSER=1, else skips
        return
    bad = c.tmp / "bad.html"
    good = (c.tmp / "html.html") if (c.tmp / "html.html").exists() else None
    text = (good.read_text() if good else "<html><body></body></html>")
    bad.write_text(text.replace("</body>", "<script>console.error('boom')</script></body>"))
    try:
        report_page.check_in_browser(bad, c.tmp / "bad.png", len(report_page.parse(bad)["images"]))
    except AssertionError as e:
        assert "boom" in str(e), e
    else:
        raise AssertionError("a console error went unnoticed")
    broken = c.tmp / "broken.html"
    broken.write_text(text.replace("data:image/jpeg;base64,", "data:image/jpeg;base64,AAAA", 1))
    try:
        report_page.check_in_browser(broken, c.tmp / "broken.png", len(report_page.parse(broken)["images"]))
    except AssertionError as e:
        assert "decoded" in str(e) or "console" in str(e), e
    else:
        raise AssertionError("an undecodable thumbnail went unnoticed")


def main():
    tests = [v for k, v in globals().items() if k.startswith("test_")]
    only = sys.argv[1:]
    passed = failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Ctx(tmp)
        for t in tests:
            if only and t.__name__ not in only:
                continue
            start = time.monotonic()
            try:
                t(ctx)
                passed += 1
                print(f"ok   {t.__name__} ({time.monotonic() - start:.1f} s)")
            except Exception:
                failed += 1
                print(f"FAIL {t.__name__}")
                traceback.print_exc()
    print(f"bags: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
