"""The JPEG-routed path (``inference.decode: infer``): preprocess routes the encoded bytes, infer decodes the
batch on its device; without a GPU it falls back to OpenCV and gives the CPU path's results."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from services.inference.jpeg import DeviceDecoder
from services.inference.service import InferService
from services.preprocess.service import PreprocessService
from shared.config import load_config
from shared.data.scenes import scene_from_source
from shared.imaging import decode_frame, encode, jpeg_reduction
from shared.keys import Keys
from shared.messages import DecodeError, Frame, Prepared, PreparedJpeg, Result, decode_prepared
from shared.prepare import plan, prepare
from shared.streams.reader import Entry


def frame(seq: int, scene="process", w=640, h=480) -> Frame:
    img, _ = scene_from_source(f"synthetic://{scene}?w={w}&h={h}&seed={seq}").render(seq)
    enc, data = encode(img, 90)
    return Frame(camera="c1", seq=seq, ts=time.time_ns(), enc=enc, shape=img.shape, dtype="uint8", data=data)


def config(redis_server, prefix, roi=None, device="cpu", read_from="prepared"):
    cam = {"id": "c1", "source": "synthetic://process", "tasks": ["classify", "detect"]}
    if roi:
        cam["roi"] = roi
    return load_config(data={
        "redis": {"url": redis_server.url, "prefix": prefix},
        "cameras": [cam, {"id": "k1", "source": "synthetic://thermal", "tasks": ["thermal"]}],
        "models": {"classify": {"arch": "simple_cnn"}, "detect": {"arch": "simple_yolo"},
                   "thermal": {"arch": "thermal_cnn"}},
        "inference": {"device": device, "max_batch": 4, "max_wait_ms": 0, "threads": 1, "decode": "infer",
                      "model_poll_s": 0, "read_from": read_from}}, environ={})


def jpeg_msgs(f: Frame, task: str, size, roi=None) -> tuple[PreparedJpeg, Prepared]:
    """The same frame as the JPEG-routed message and as the CPU path's prepared message."""
    from shared.config import CameraConfig

    cam = CameraConfig(id="c1", source="synthetic://process", tasks=[task], roi=roi)
    lb, used = plan(f.shape[:2], cam.roi, task, size)
    j = PreparedJpeg(camera="c1", seq=f.seq, ts=f.ts, task=task, frame_id="1-0", shape=(*size, 3), dtype="uint8",
                     data=f.data, orig=f.shape[:2], letterbox=lb, roi=used, enc="jpeg")
    k = jpeg_reduction(f.shape[:2], cam.roi, [(size, task in ("detect", "segment"))])  # as preprocess decodes
    img, lb2, used2 = prepare(decode_frame(f, k), cam, task, size, k)
    p = Prepared(camera="c1", seq=f.seq, ts=f.ts, task=task, frame_id="1-0", shape=img.shape, dtype="uint8",
                 data=img.tobytes(), orig=f.shape[:2], letterbox=lb2, roi=used2)
    assert (tuple(lb), tuple(used)) == (tuple(lb2), tuple(used2))  # planned without decoding, the same numbers
    return j, p


@pytest.mark.parametrize("task,size,roi", [("classify", (224, 224), None), ("detect", (448, 448), None),
                                           ("detect", (448, 448), (100, 60, 400, 300)),
                                           ("classify", (224, 224), (600, 400, 200, 200))])
def test_without_a_gpu_the_decoder_gives_exactly_the_cpu_paths_pixels(task, size, roi):
    dec = DeviceDecoder("cuda" if torch.cuda.is_available() else "cpu")
    pairs = [jpeg_msgs(frame(s), task, size, roi) for s in range(3)]
    got, bad = dec.decode_batch([j for j, _ in pairs])
    assert bad == []
    assert got.shape == (3, *size, 3) and got.dtype == torch.uint8
    want = np.stack([p.array() for _, p in pairs])
    if dec.method == "cpu":
        assert np.array_equal(got.cpu().numpy(), want)
        stale = torch.full((3, *size, 3), 200, dtype=torch.uint8)  # a pool buffer holding the last batch
        again, bad = dec.decode_batch([j for j, _ in pairs], out=stale)
        assert bad == [] and again.data_ptr() == stale.data_ptr()
        assert np.array_equal(stale.numpy(), want)  # letterbox fill included
    else:  # on a GPU: nvJPEG and a bilinear resize on the device, close to OpenCV's
        assert np.abs(got.cpu().numpy().astype(int) - want).mean() < 3


@pytest.mark.parametrize("task,size,roi", [("classify", (224, 224), None), ("detect", (448, 448), (100, 60, 400, 300))])
def test_the_gpu_code_path_run_on_the_cpu_matches_the_cpu_path_within_tolerance(task, size, roi):
    pairs = [jpeg_msgs(frame(s), task, size, roi) for s in range(3)]
    got, bad = DeviceDecoder("cpu", method="torch").decode_batch([j for j, _ in pairs])
    assert bad == []
    want = np.stack([p.array() for _, p in pairs]).astype(int)
    diff = np.abs(got.numpy().astype(int) - want)
    assert diff.mean() < 3.0, diff.mean()  # JPEG decoders and resize kernels differ in rounding only
    if task == "detect":  # the letterbox padding is exactly where the CPU path puts it
        py = pairs[0][0].letterbox[2]
        assert np.array_equal(got.numpy()[:, :py], want[:, :py]) and py > 0


def test_a_corrupt_jpeg_is_reported_by_index_and_the_rest_decode():
    good, _ = jpeg_msgs(frame(0), "classify", (224, 224))
    broken = PreparedJpeg(camera="c1", seq=1, ts=good.ts, task="classify", frame_id="1-1", shape=good.shape,
                          dtype="uint8", data=b"\xff\xd8 not a jpeg", orig=good.orig, letterbox=good.letterbox,
                          roi=good.roi)
    for method in ("cpu", "torch"):
        out, bad = DeviceDecoder("cpu", method=method).decode_batch([good, broken, good])
        assert bad == [1], method
        assert torch.equal(out[0], out[2])


def test_the_jpeg_variant_round_trips_and_the_raw_decoder_refuses_it():
    j, _ = jpeg_msgs(frame(0), "classify", (224, 224))
    back = decode_prepared(j.to_msgpack(), 1 << 20)
    assert isinstance(back, PreparedJpeg) and back.data == j.data and back.shape == (224, 224, 3)
    with pytest.raises(DecodeError):
        Prepared.from_msgpack(j.to_msgpack())  # a consumer that knows only raw pixels fails loudly
    with pytest.raises(DecodeError, match="enc"):
        decode_prepared(j.to_msgpack().replace(b"\xa4jpeg", b"\xa4webp"), 1 << 20)


def test_preprocess_routes_jpeg_bytes_undecoded_and_still_decodes_for_thermal(redis_server, r, prefix):
    cfg = config(redis_server, prefix, roi=[100, 60, 400, 300])
    svc = PreprocessService(cfg, port=0)
    svc.setup()
    f = frame(5)
    entry_id = r.xadd(svc.keys.frames, {"m": f.to_msgpack(), "cam": "c1"}).decode()
    svc.step()
    for task, size in (("classify", (224, 224)), ("detect", (448, 448))):
        ((_, fields),) = r.xrange(svc.keys.prepared(task))
        msg = decode_prepared(fields[b"m"], 1 << 25)
        assert isinstance(msg, PreparedJpeg) and msg.data == f.data  # the camera's bytes, not decoded
        assert msg.shape == (*size, 3) and msg.frame_id == entry_id and msg.roi == (100, 60, 400, 300)
    assert r.xpending(svc.keys.frames, "preprocess")["pending"] == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_infer_results_from_jpeg_routed_frames_equal_the_cpu_paths(redis_server, r, prefix, device):
    svc = InferService(config(redis_server, prefix, device=device), tasks=["classify"], port=0)
    assert svc.jpeg.method == ("torch" if device == "cuda" else "cpu")  # nvJPEG on the GPU, else libjpeg-turbo
    svc.setup()
    run = svc.runners[0]
    stream = svc.keys.prepared("classify")
    frames = [frame(s) for s in range(4)]
    pairs = [jpeg_msgs(f, "classify", (224, 224)) for f in frames]
    for j, _ in pairs:
        r.xadd(stream, {"m": j.to_msgpack(), "cam": "c1"})
    broken = PreparedJpeg(camera="c1", seq=99, ts=time.time_ns(), task="classify", frame_id="1-9", shape=(224, 224, 3),
                          dtype="uint8", data=b"\xff\xd8garbage", orig=(480, 640), letterbox=(1.0, 0, 0))
    bad_id = r.xadd(stream, {"m": broken.to_msgpack(), "cam": "c1"}).decode()
    svc.process(run, svc.collect(run, 100)[:4])
    svc.process(run, svc.collect(run, 100))
    got = [Result.from_msgpack(f[b"m"]) for _, f in r.xrange(svc.keys.results)]
    assert [m.seq for m in got] == [0, 1, 2, 3]
    want = svc.predict(run, [(Entry("0-0", {}), p) for _, p in pairs])
    for res, out in zip(got, want):
        assert res.out["index"] == out["index"]
        assert np.allclose(res.out["probs"], out["probs"], atol=1e-4 if svc.jpeg.method == "cpu" else 2e-2)
    ((_, letter),) = r.xrange(svc.keys.deadletter)
    assert letter[b"id"].decode() == bad_id and letter[b"reason"] == b"decode_error"
    assert r.xpending(stream, "infer-classify")["pending"] == 0


def test_infer_reading_the_frames_itself_gives_the_preprocess_paths_results(redis_server, r, prefix):
    """``inference.read_from: frames``: each task's infer group reads ``{P}:frames``; the reader thread does
    preprocess's work (JPEGs decoded with the batch, a radiometric PNG decoded as preprocess would), skips the
    frames of cameras that do not feed the task, and a frame nobody can read is dead-lettered once, not once
    per task. No ``prepared`` stream is written."""
    cfg = config(redis_server, prefix, read_from="frames")
    svc = InferService(cfg, port=0)
    assert svc.keys.infer_reads_frames and [run.reader.stream for run in svc.runners] == [svc.keys.frames] * 3
    svc.setup()
    frames = [frame(s) for s in range(3)]
    ids = [r.xadd(svc.keys.frames, {"m": f.to_msgpack(), "cam": "c1"}).decode() for f in frames]
    kelvin = np.full((120, 160, 1), 30_000, np.uint16)  # 300.00 K everywhere, centikelvin
    kelvin[10, 20] = 35_000
    enc, data = encode(kelvin)
    hot = Frame(camera="k1", seq=7, ts=time.time_ns(), enc=enc, shape=kelvin.shape, dtype="uint16", data=data)
    ids.append(r.xadd(svc.keys.frames, {"m": hot.to_msgpack(), "cam": "k1"}).decode())
    garbage = r.xadd(svc.keys.frames, {"m": b"\x00not msgpack", "cam": "c1"}).decode()
    stranger = Frame(camera="nobody", seq=0, ts=time.time_ns(), enc="jpeg", shape=frames[0].shape, dtype="uint8",
                     data=frames[0].data)
    unknown = r.xadd(svc.keys.frames, {"m": stranger.to_msgpack(), "cam": "nobody"}).decode()
    for run in svc.runners:  # batches of max_batch (4) until each group has read all six entries
        while entries := svc.collect(run, 100):
            svc.process(run, entries)

    got = [Result.from_msgpack(f[b"m"]) for _, f in r.xrange(svc.keys.results)]
    assert sorted((m.task, m.camera, m.seq) for m in got) == sorted(
        [("classify", "c1", s) for s in range(3)] + [("detect", "c1", s) for s in range(3)] + [("thermal", "k1", 7)])
    assert {m.frame_id for m in got} == set(ids)  # the frames' own ids, for the evidence lookups
    assert all(set(m.t) == {"preprocess", "infer"} for m in got)
    run = svc.runners[0]
    assert run.task == "classify"
    want = svc.predict(run, [(Entry("0-0", {}), jpeg_msgs(f, "classify", (224, 224))[1]) for f in frames])
    for res, out in zip([m for m in got if m.task == "classify"], want):  # the preprocess path's pixels, exactly
        assert res.out["index"] == out["index"] and np.allclose(res.out["probs"], out["probs"], atol=1e-4)
    (thermal,) = [m for m in got if m.task == "thermal"]
    assert thermal.out["source"] == "radiometric" and thermal.out["max_k"] == 350.0 and thermal.out["min_k"] == 300.0

    letters = [(f[b"id"].decode(), f[b"reason"].decode(), f[b"stage"].decode()) for _,
               f in r.xrange(svc.keys.deadletter)]
    assert sorted(letters) == sorted([(garbage, "decode_error", "infer"), (unknown, "unknown_camera", "infer")])
    for run in svc.runners:  # every group has read and acknowledged every frame
        (group,) = [g for g in r.xinfo_groups(svc.keys.frames) if g["name"].decode() == f"infer-{run.task}"]
        assert group["pending"] == 0 and group["last-delivered-id"].decode() == unknown, run.task
    assert not r.keys(Keys(prefix).prepared("*"))
