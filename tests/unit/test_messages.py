"""The message codec: round trips, zero-copy arrays, and one error type for every bad input."""

from __future__ import annotations

import re
import uuid

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.messages import MESSAGES, VERSION, Alert, DecodeError, Frame, Prepared, Result

PIXELS = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)


def raw_frame(**kw) -> Frame:
    args = dict(camera="kiln-1", seq=7, ts=1_700_000_000_123_456_789, enc="raw", shape=(4, 5, 3), dtype="uint8",
                data=PIXELS.tobytes(), meta={"exposure_us": 800, "source": "synthetic://thermal"})
    return Frame(**{**args, **kw})


def prepared() -> Prepared:
    return Prepared(camera="line-2", seq=3, ts=1_700_000_000_000_000_000, task="detect", frame_id="1700000000000-0",
                    shape=(4, 5, 3), dtype="uint8", data=PIXELS.tobytes(), orig=(528, 720),
                    letterbox=(448 / 720, 0, 59), roi=(10, 20, 700, 500), t={"decode": 0.0012, "resize": 0.0004})


def result() -> Result:
    return Result(camera="line-2", seq=3, ts=1_700_000_000_000_000_000, task="classify", frame_id="1700000000000-0",
                  model="simple_cnn@3", t={"infer": 0.004},
                  out={"label": "anomaly", "index": 1, "probs": [0.125, 0.875], "classes": ["normal", "anomaly"]})


def alert(**kw) -> Alert:
    args = dict(id=Alert.identity("kiln-overheat", "kiln-1", "1700000000000-0"), rule="kiln-overheat",
                severity="critical", state="firing", camera="kiln-1", task="thermal", ts=1_700_000_000_000_000_000,
                value=455.5, threshold=450.0, message="max_k 455.5 >= 450", frame_id="1700000000000-0",
                evidence="evidence/kiln-1/1700000000000-0.jpg", labels={"line": "a"})
    return Alert(**{**args, **kw})


def wire(msg) -> dict:
    """The msgpack map of a message, to edit into a malformed one."""
    return msgpack.unpackb(msg.to_msgpack(), raw=False)


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# --- round trips ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [raw_frame, prepared, result, alert, lambda: alert(state="resolved", threshold=None)],
                         ids=["frame", "prepared", "result", "alert", "alert-resolved"])
def test_round_trip_is_equal(make):
    msg = make()
    back = type(msg).from_msgpack(msg.to_msgpack())
    assert back == msg
    assert type(back) is type(msg)
    assert MESSAGES[msg.kind] is type(msg)


def test_wire_map_has_the_documented_keys():
    assert wire(raw_frame()) == {"v": VERSION, "camera": "kiln-1", "seq": 7, "ts": 1_700_000_000_123_456_789,
                                 "enc": "raw", "shape": [4, 5, 3], "dtype": "uint8", "data": PIXELS.tobytes(),
                                 "meta": {"exposure_us": 800, "source": "synthetic://thermal"}}
    assert set(wire(prepared())) == {"v", "camera", "seq", "ts", "task", "frame_id", "shape", "dtype", "data", "orig",
                                     "letterbox", "roi", "t"}
    assert set(wire(result())) == {"v", "camera", "seq", "ts", "task", "frame_id", "model", "t", "out"}
    assert set(wire(alert())) == {"v", "id", "rule", "severity", "state", "camera", "task", "ts", "value", "threshold",
                                  "message", "frame_id", "evidence", "labels"}


def test_prepared_normalises_sequences_to_tuples():
    msg = Prepared.from_msgpack(prepared().to_msgpack())
    assert msg.shape == (4, 5, 3)
    assert msg.orig == (528, 720)
    assert msg.letterbox == (448 / 720, 0, 59)
    assert msg.roi == (10, 20, 700, 500)


def test_decoded_arrays_are_read_only_views_of_the_message_bytes():
    frame = Frame.from_msgpack(raw_frame().to_msgpack())
    arr = frame.array()
    assert arr.shape == (4, 5, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr, PIXELS)
    assert arr.flags.writeable is False
    assert arr.flags.owndata is False
    # frombuffer over frame.data: both views share the one buffer, nothing was copied
    assert np.shares_memory(arr, np.frombuffer(frame.data, dtype=np.uint8))
    with pytest.raises(ValueError):
        arr[0, 0, 0] = 1

    prep = Prepared.from_msgpack(prepared().to_msgpack())
    parr = prep.array()
    assert parr.flags.writeable is False
    assert np.shares_memory(parr, np.frombuffer(prep.data, dtype=np.uint8))


def test_uint16_raw_frame_round_trip():
    therm = (np.arange(6 * 8, dtype=np.uint16).reshape(6, 8, 1) * 97 + 27315)
    frame = Frame(camera="kiln-1", seq=0, ts=1, enc="raw", shape=(6, 8, 1), dtype="uint16", data=therm.tobytes())
    arr = Frame.from_msgpack(frame.to_msgpack()).array()
    assert arr.dtype == np.uint16
    assert np.array_equal(arr, therm)


def test_array_of_an_encoded_frame_is_refused():
    frame = raw_frame(enc="jpeg", data=b"\xff\xd8not really")
    with pytest.raises(DecodeError, match="enc is jpeg"):
        frame.array()


# --- malformed input: DecodeError and nothing else -----------------------------------------------------------------

def _edit(**changes) -> bytes:
    obj = wire(raw_frame())
    for k, v in changes.items():
        if v is _DELETE:
            del obj[k]
        else:
            obj[k] = v
    return pack(obj)


_DELETE = object()
VALID = raw_frame().to_msgpack()

MALFORMED = {
    "garbage": (b"\xc1\x00\xff garbage \x13", "not valid msgpack"),
    "empty": (b"", "not valid msgpack"),
    "truncated": (VALID[:-7], "not valid msgpack"),
    "trailing-bytes": (VALID + b"\x00", "not valid msgpack"),
    "top-level-list": (pack([1, 2, 3]), "top level is list, not a map"),
    "top-level-int": (pack(42), "top level is int, not a map"),
    "wrong-version": (_edit(v=2), "schema version 2 is not 1"),
    "version-true": (_edit(v=True), "schema version True is not 1"),
    "version-float": (_edit(v=1.0), "schema version 1.0 is not 1"),
    "no-version": (_edit(v=_DELETE), "schema version None is not 1"),
    "missing-seq": (_edit(seq=_DELETE), "missing field 'seq'"),
    "missing-data": (_edit(data=_DELETE), "missing field 'data'"),
    "bool-seq": (_edit(seq=True), "field 'seq' is bool, expected int"),
    "str-ts": (_edit(ts="now"), "field 'ts' is str, expected int"),
    "str-data": (_edit(data="abc"), "field 'data' is str, expected bytes"),
    "list-meta": (_edit(meta=[1]), "field 'meta' is list, expected dict"),
    "raw-size-mismatch": (_edit(data=PIXELS.tobytes()[:-1]),
                          re.escape("frame data has 59 bytes, shape [4, 5, 3] uint8 needs 60")),
    "raw-uint16-mismatch": (_edit(dtype="uint16"),
                            re.escape("frame data has 60 bytes, shape [4, 5, 3] uint16 needs 120")),
    "bad-dtype": (_edit(dtype="float32"), "dtype 'float32' is not one of"),
    "bad-enc": (_edit(enc="gif"), "enc 'gif' is not one of"),
    "negative-seq": (_edit(seq=-1), "negative seq"),
    "too-many-channels": (_edit(shape=[2, 2, 5], data=bytes(20)), "has 5 channels"),
    "zero-dimension": (_edit(shape=[0, 5, 3]), "not an integer in 1..16384"),
    "huge-dimension": (_edit(shape=[16385, 1, 3]), "not an integer in 1..16384"),
    "float-dimension": (_edit(shape=[4.0, 5, 3]), "not an integer in 1..16384"),
    "bool-dimension": (_edit(shape=[True, 5, 3]), "not an integer in 1..16384"),
    "one-dimension": (_edit(shape=[60]), "must be \\[h, w\\] or \\[h, w, c\\]"),
    "empty-camera": (_edit(camera=""), "empty camera id"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_frame_raises_decode_error(name):
    raw, why = MALFORMED[name]
    with pytest.raises(DecodeError, match=why) as info:
        Frame.from_msgpack(raw)
    assert type(info.value) is DecodeError
    assert str(info.value).startswith("frame")  # the message says which kind of message was bad


def test_oversized_message_is_refused_before_unpacking():
    assert Frame.from_msgpack(VALID, max_bytes=len(VALID)) == raw_frame()
    with pytest.raises(DecodeError, match=f"message of {len(VALID)} bytes exceeds the limit of {len(VALID) - 1}"):
        Frame.from_msgpack(VALID, max_bytes=len(VALID) - 1)


def test_non_bytes_payload_is_refused():
    with pytest.raises(DecodeError, match="payload is not bytes"):
        Frame.from_msgpack("not bytes")  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="payload is not bytes"):
        Frame.from_msgpack(None)  # type: ignore[arg-type]


def test_other_messages_validate_too():
    prep = wire(prepared())
    with pytest.raises(DecodeError, match="prepared letterbox must be"):
        Prepared.from_msgpack(pack({**prep, "letterbox": [1.0, 0]}))
    with pytest.raises(DecodeError, match="prepared letterbox scale must be > 0"):
        Prepared.from_msgpack(pack({**prep, "letterbox": [0.0, 0, 0]}))
    with pytest.raises(DecodeError, match="prepared roi must be"):
        Prepared.from_msgpack(pack({**prep, "roi": [0, -1, 2, 2]}))
    with pytest.raises(DecodeError, match="prepared shape must be \\[h, w, c\\]"):
        Prepared.from_msgpack(pack({**prep, "shape": [4, 15]}))
    with pytest.raises(DecodeError, match="prepared data has 59 bytes"):
        Prepared.from_msgpack(pack({**prep, "data": PIXELS.tobytes()[1:]}))
    with pytest.raises(DecodeError, match="result: missing field 'out'"):
        Result.from_msgpack(pack({k: v for k, v in wire(result()).items() if k != "out"}))
    with pytest.raises(DecodeError, match="alert: state 'maybe' is not firing/resolved"):
        Alert.from_msgpack(pack({**wire(alert()), "state": "maybe"}))
    with pytest.raises(DecodeError, match="alert: field 'value' is bool"):
        Alert.from_msgpack(pack({**wire(alert()), "value": False}))
    with pytest.raises(DecodeError, match="alert: field 'threshold' is str"):
        Alert.from_msgpack(pack({**wire(alert()), "threshold": "450"}))
    # a frame is not a result: the type checks catch a message on the wrong stream
    with pytest.raises(DecodeError, match="result: missing field 'task'"):
        Result.from_msgpack(VALID)


# --- fuzzing ---------------------------------------------------------------------------------------------------------

def _frame_or_decode_error(raw: bytes) -> None:
    try:
        frame = Frame.from_msgpack(raw)
    except DecodeError:
        return
    assert isinstance(frame, Frame)
    if frame.enc == "raw":  # a frame that decoded has pixels matching its shape
        assert frame.array().shape == tuple(frame.shape)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(raw):
    _frame_or_decode_error(raw)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["flip", "insert", "delete"]), st.integers(0, len(VALID) - 1),
                          st.integers(0, 255)), min_size=1, max_size=6))
def test_fuzz_mutated_frame(mutations):
    raw = bytearray(VALID)
    for op, pos, byte in mutations:
        pos = min(pos, len(raw) - 1) if raw else 0
        if op == "flip" and raw:
            raw[pos] ^= byte or 0xFF
        elif op == "insert":
            raw.insert(pos, byte)
        elif op == "delete" and raw:
            del raw[pos]
    _frame_or_decode_error(bytes(raw))


_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2 ** 63), 2 ** 64 - 1) | st.floats()
                       | st.text(max_size=8) | st.binary(max_size=64),
                       lambda inner: (st.lists(inner, max_size=4)
                                      | st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                       max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([raw_frame, prepared, result, alert]), st.data())
def test_fuzz_field_values(make, data):
    """Any msgpack value in any field of any message: the decoded message, or DecodeError."""
    msg = make()
    obj = wire(msg)
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(_VALUES)
    try:
        back = type(msg).from_msgpack(pack(obj))
    except DecodeError:
        return
    assert type(back) is type(msg)


# --- alert identity --------------------------------------------------------------------------------------------------

def test_alert_identity_is_deterministic_and_distinct():
    a = Alert.identity("kiln-overheat", "kiln-1", "1700000000000-0")
    assert a == Alert.identity("kiln-overheat", "kiln-1", "1700000000000-0")
    assert a == "37f88f0f-de25-5cbc-8bea-6459bb4258ee"  # stable across releases: sinks deduplicate on it
    assert uuid.UUID(a).version == 5
    others = {Alert.identity("kiln-overheat", "kiln-1", f"1700000000000-{i}") for i in range(1, 50)}
    others |= {Alert.identity("kiln-overheat", "kiln-2", "1700000000000-0"),
               Alert.identity("kiln-leak", "kiln-1", "1700000000000-0")}
    assert len(others) == 51
    assert a not in others
