"""Wire messages: frames survive any split of the byte stream; oversize frames are refused."""

from __future__ import annotations

import itertools
import struct

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cirrus.wire import (
    MAX_FRAME_BYTES,
    WIRE_VERSION,
    Frame,
    FrameBuffer,
    Hello,
    InferRequest,
    InferResponse,
    ReplicaFailed,
    ReplicaLaunch,
    ReplicaReady,
    decode_launch,
    decode_startup,
    encode_frame,
    encode_launch,
    encode_startup,
)

text = st.text(max_size=20)
headers = st.lists(st.tuples(text, text), max_size=3)

hellos = st.builds(Hello, version=st.integers(0, 2**31), replica_id=text, pid=st.integers(0, 2**22))
requests = st.builds(
    InferRequest,
    id=st.integers(0, 2**63 - 1),
    request_id=text,
    body=st.binary(max_size=300),
    content_type=text,
    query_string=st.binary(max_size=20),
    headers=headers,
    timeout_s=st.floats(0, 1e6, allow_nan=False),
)
responses = st.builds(
    InferResponse,
    id=st.integers(0, 2**63 - 1),
    status=st.integers(100, 599),
    body=st.binary(max_size=300),
    content_type=text,
    headers=headers,
)
frames = st.lists(st.one_of(hellos, requests, responses), max_size=8)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


@given(messages=frames, cuts=st.lists(st.integers(0, 10_000), max_size=20))
@settings(max_examples=200, deadline=None, database=None)
def test_frames_round_trip_across_any_chunking(messages: list[Frame], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    buffer = FrameBuffer()
    received: list[Frame] = []
    for chunk in split(stream, cuts):
        received.extend(buffer.feed(chunk))
    assert received == messages
    assert buffer.feed(b"") == []  # nothing left over


@given(messages=frames)
@settings(max_examples=50, deadline=None, database=None)
def test_one_byte_at_a_time(messages: list[Frame]) -> None:
    stream = b"".join(encode_frame(m) for m in messages)
    buffer = FrameBuffer()
    received: list[Frame] = []
    for i in range(len(stream)):
        received.extend(buffer.feed(stream[i : i + 1]))
    assert received == messages


def test_frame_layout() -> None:
    frame = encode_frame(Hello(version=WIRE_VERSION, replica_id="r1", pid=7))
    (length,) = struct.unpack(">I", frame[:4])
    assert length == len(frame) - 4
    assert msgspec.msgpack.decode(frame[4:])["type"] == "hello"


def test_defaults_survive() -> None:
    request = InferRequest(id=1, request_id="abc", body=b"{}", content_type="application/json")
    [decoded] = FrameBuffer().feed(encode_frame(request))
    assert decoded == request
    assert isinstance(decoded, InferRequest)
    assert (decoded.query_string, decoded.headers, decoded.timeout_s) == (b"", [], 30.0)


def test_oversize_frame_is_rejected_before_buffering_it() -> None:
    buffer = FrameBuffer()
    with pytest.raises(ValueError, match="exceeds the limit"):
        buffer.feed(struct.pack(">I", MAX_FRAME_BYTES + 1) + b"x" * 10)


def test_frame_at_the_limit_waits_for_more_bytes() -> None:
    buffer = FrameBuffer()
    assert buffer.feed(struct.pack(">I", MAX_FRAME_BYTES) + b"x" * 10) == []


def test_garbage_and_unknown_tags_fail_to_decode() -> None:
    with pytest.raises(msgspec.DecodeError):
        FrameBuffer().feed(struct.pack(">I", 3) + b"\xc1\xc1\xc1")
    payload = msgspec.msgpack.encode({"type": "nope", "id": 1})
    with pytest.raises(msgspec.ValidationError):
        FrameBuffer().feed(struct.pack(">I", len(payload)) + payload)


def test_startup_reports_round_trip() -> None:
    ready = ReplicaReady(address="tcp:127.0.0.1:5000", pid=42, load_s=1.5, openapi={"openapi": "3.1.0"})
    failed = ReplicaFailed(error="ImportError: no module named torch")
    for report in (ready, failed):
        line = encode_startup(report)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode_startup(line.strip()) == report


def test_launch_round_trips() -> None:
    launch = ReplicaLaunch(
        api="a",
        replica_id="a-1",
        revision=3,
        project_dir="/p",
        predictor_path="predictor.py",
        class_name="Predictor",
        config={"k": [1, "x"]},
        inference_slots=2,
        secret=b"\x00\xffsecret",
    )
    decoded = decode_launch(encode_launch(launch))
    assert decoded == launch
    assert decoded.version == WIRE_VERSION
