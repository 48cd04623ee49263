"""The benchmark's split of capture → result at the frame's entry in {P}:frames, on made-up results."""

from __future__ import annotations

from bench.pipeline import latency_parts

T0 = 1_700_000_000_000  # ms


def result(i: int, to_frames: int, after: int) -> tuple[str, dict]:
    """The i-th result: captured at T0 + i, in {P}:frames ``to_frames`` ms later, its result ``after`` ms after that."""
    written = T0 + i + to_frames
    return f"{written + after}-0", {"ts": (T0 + i) * 1_000_000, "frame_id": f"{written}-3", "t": {"infer": 0.002}}


def test_the_slowest_frames_say_which_side_of_the_frames_stream_their_time_went():
    window = [result(i, to_frames=i, after=10) for i in range(99)] + [result(99, to_frames=99, after=500)]
    parts = latency_parts(window)
    assert parts["to_frames_ms"] == {"p50": 50.0, "p99": 98.0}
    assert parts["after_frames_ms"] == {"p50": 10.0, "p99": 10.0}
    # totals are i + 10, the last 599: the slowest 1 % is the p99 frame (108 ms) and the last
    assert parts["slowest_1pct"] == {"frames": 2, "total_ms": 353.5, "to_frames_ms": 98.5, "after_frames_ms": 255.0,
                                     "model_ms_per_frame": 2.0}


def test_an_empty_window_has_no_parts():
    assert latency_parts([]) == {}
