"""Pixel work: encode/decode of real photos, bad frames, letterbox geometry, ROI crops."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from shared.imaging import crop, decode_frame, encode, letterbox, stretch
from shared.messages import DecodeError, Frame

# lowest PSNR (dB) of a quality-90 JPEG round trip; measured 30.9, 37.0 and 48.4 with OpenCV's libjpeg
JPEG_PSNR = {"baboon.jpg": 29.5, "fruits.jpg": 35.5, "building.jpg": 46.5}


def photo(shared_data, name: str) -> np.ndarray:
    bgr = cv2.imread(str(shared_data / name))
    assert bgr is not None, name
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def frame_of(image: np.ndarray, enc: str, data: bytes, shape=None, dtype=None) -> Frame:
    return Frame(camera="cam-1", seq=1, ts=1, enc=enc, shape=tuple(shape or image.shape),
                 dtype=dtype or str(image.dtype), data=data)


@pytest.mark.parametrize("name", sorted(JPEG_PSNR))
def test_jpeg_round_trip_of_a_real_photo(shared_data, name):
    image = photo(shared_data, name)
    enc, data = encode(image)
    assert enc == "jpeg"
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    back = decode_frame(frame_of(image, enc, data))
    assert back.shape == image.shape and back.dtype == np.uint8
    assert cv2.PSNR(back, image) >= JPEG_PSNR[name]


def test_jpeg_keeps_rgb_channel_order():
    image = np.zeros((32, 48, 3), np.uint8)
    image[:, :16] = (255, 0, 0)
    image[:, 16:32] = (0, 255, 0)
    image[:, 32:] = (0, 0, 255)
    enc, data = encode(image, quality=95)
    back = decode_frame(frame_of(image, enc, data)).astype(int)
    for x, rgb in ((8, (255, 0, 0)), (24, (0, 255, 0)), (40, (0, 0, 255))):
        assert np.abs(back[16, x] - np.array(rgb)).max() <= 8, (x, back[16, x])


def test_png_is_exact_for_radiometric_uint16(shared_data):
    gray = cv2.cvtColor(photo(shared_data, "building.jpg"), cv2.COLOR_RGB2GRAY)
    centikelvin = (gray.astype(np.uint16) * 100 + 27315)[:, :, None]  # 0..255 K above 0 °C, in 0.01 K
    assert centikelvin.shape == (600, 868, 1)
    enc, data = encode(centikelvin)
    assert enc == "png"
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    back = decode_frame(frame_of(centikelvin, enc, data))
    assert back.dtype == np.uint16 and back.shape == (600, 868, 1)
    assert np.array_equal(back, centikelvin)


def test_png_is_exact_for_uint8_single_channel(shared_data):
    gray = cv2.cvtColor(photo(shared_data, "fruits.jpg"), cv2.COLOR_RGB2GRAY)[:, :, None]
    enc, data = encode(gray)
    assert enc == "png"
    assert np.array_equal(decode_frame(frame_of(gray, enc, data)), gray)


def test_raw_frame_decodes_without_copy(shared_data):
    image = photo(shared_data, "fruits.jpg")
    frame = frame_of(image, "raw", image.tobytes())
    back = decode_frame(frame)
    assert np.array_equal(back, image)
    assert back.flags.writeable is False
    assert np.shares_memory(back, np.frombuffer(frame.data, np.uint8))


@pytest.mark.parametrize("keep", [0.5, 0.1, 0.01, 0.001])
def test_truncated_jpeg_is_a_decode_error(shared_data, keep):
    image = photo(shared_data, "baboon.jpg")
    _, data = encode(image)
    cut = data[: max(1, int(len(data) * keep))]
    with pytest.raises(DecodeError, match="cam-1#1: jpeg bytes do not decode to an image"):
        decode_frame(frame_of(image, "jpeg", cut))


def test_empty_and_garbage_bytes_are_decode_errors():
    image = np.zeros((4, 4, 3), np.uint8)
    for data in (b"", b"definitely not a picture", b"\x89PNG\r\n\x1a\n" + bytes(64)):
        with pytest.raises(DecodeError, match="do not decode to an image"):
            decode_frame(frame_of(image, "png", data))


def test_declared_shape_or_dtype_disagreeing_is_a_decode_error(shared_data):
    image = photo(shared_data, "fruits.jpg")
    assert image.shape == (480, 512, 3)
    enc, data = encode(image)
    with pytest.raises(DecodeError, match=r"decoded uint8 \[480, 512, 3\] but the message says uint8 \[481, 512, 3\]"):
        decode_frame(frame_of(image, enc, data, shape=(481, 512, 3)))
    with pytest.raises(DecodeError, match=r"but the message says uint8 \[480, 512, 1\]"):
        decode_frame(frame_of(image, enc, data, shape=(480, 512)))
    with pytest.raises(DecodeError, match=r"decoded uint8 \[480, 512, 3\] but the message says uint16 \[480, 512, 3\]"):
        decode_frame(frame_of(image, enc, data, dtype="uint16"))


def test_letterbox_720x528_to_448(shared_data):
    image = cv2.resize(photo(shared_data, "fruits.jpg"), (720, 528))  # the size of the shared video's frames
    assert image.shape == (528, 720, 3)
    out, (scale, pad_x, pad_y) = letterbox(image, (448, 448))
    assert out.shape == (448, 448, 3) and out.dtype == np.uint8
    assert scale == 448 / 720
    assert (pad_x, pad_y) == (0, 59)  # 528 * 448/720 = 328.53 -> 329 rows, (448 - 329) // 2 = 59 above
    assert (out[:59] == 114).all() and (out[59 + 329:] == 114).all()  # 59 rows above, 60 below
    content = out[59:59 + 329]
    assert not (content == 114).all(axis=(1, 2)).any()  # every content row holds picture

    def forward(x, y):
        return x * scale + pad_x, y * scale + pad_y

    def back(x, y):
        return (x - pad_x) / scale, (y - pad_y) / scale

    assert forward(0, 0) == (0, 59)
    assert forward(720, 0) == (448, 59)
    assert back(448, 59) == (720, 0)
    for x, y in ((0, 0), (360, 264), (719, 527), (123, 456)):
        assert back(*forward(x, y)) == pytest.approx((x, y), abs=1e-9)


def test_letterbox_puts_a_marker_where_the_mapping_says():
    image = np.zeros((528, 720, 3), np.uint8)
    image[300:400, 500:620] = 255  # x 500..619, y 300..399
    out, (scale, pad_x, pad_y) = letterbox(image, (448, 448), fill=0)
    ys, xs = np.nonzero(out[:, :, 0] > 127)
    x1, y1 = (xs.min() - pad_x) / scale, (ys.min() - pad_y) / scale
    x2, y2 = (xs.max() + 1 - pad_x) / scale, (ys.max() + 1 - pad_y) / scale
    assert (x1, y1, x2, y2) == pytest.approx((500, 300, 620, 400), abs=2.0)


def test_letterbox_tall_and_single_channel():
    image = np.full((200, 100, 1), 7, np.uint16)
    out, (scale, pad_x, pad_y) = letterbox(image, (448, 448), fill=0)
    assert out.shape == (448, 448, 1) and out.dtype == np.uint16
    assert (scale, pad_x, pad_y) == (2.24, 112, 0)
    assert (out[:, 112:336] == 7).all() and (out[:, :112] == 0).all() and (out[:, 336:] == 0).all()


def test_resize_averages_areas_only_below_half_size():
    from shared.imaging import resize_method

    assert resize_method((480, 640), (224, 224)) == cv2.INTER_AREA  # 640 → 224 would skip pixels bilinearly
    assert resize_method((240, 320), (224, 224)) == cv2.INTER_LINEAR  # after a 1/2 JPEG decode
    assert resize_method((448, 300), (224, 224)) == cv2.INTER_LINEAR  # exactly half
    assert resize_method((449, 300), (224, 224)) == cv2.INTER_AREA
    assert resize_method((100, 100), (224, 224)) == cv2.INTER_LINEAR  # enlarging
    # fine stripes a pixel wide: at 0.7× bilinear keeps their mean brightness as area averaging does
    stripes = np.zeros((240, 320, 3), np.uint8)
    stripes[:, ::2] = 200
    lin, _ = stretch(stripes, (224, 224))
    area = cv2.resize(stripes, (224, 224), interpolation=cv2.INTER_AREA)
    assert abs(float(lin.mean()) - float(area.mean())) < 2


def test_stretch_ignores_aspect():
    image = np.zeros((528, 720, 3), np.uint8)
    out, (sx, sy) = stretch(image, (224, 224))
    assert out.shape == (224, 224, 3)
    assert (sx, sy) == (224 / 720, 224 / 528)


def test_crop_with_roi_clipping():
    image = np.arange(100 * 200 * 3, dtype=np.uint32).reshape(100, 200, 3)
    part, used = crop(image, (150, 80, 100, 50))  # runs 50 px past the right edge, 30 past the bottom
    assert used == (150, 80, 50, 20)
    assert part.shape == (20, 50, 3)
    assert np.array_equal(part, image[80:100, 150:200])
    assert np.shares_memory(part, image)  # a view, not a copy

    inside, used = crop(image, (10, 20, 30, 40))
    assert used == (10, 20, 30, 40)
    assert np.array_equal(inside, image[20:60, 10:40])

    whole, used = crop(image, None)
    assert used == (0, 0, 0, 0)
    assert whole is image


# --- decoding a JPEG straight to a smaller size (preprocess, when every task only scales down) -------
def test_jpeg_reduction_picks_the_largest_factor_that_only_scales_down_and_divides_everything():
    from shared.imaging import jpeg_reduction

    vga = (480, 640)
    assert jpeg_reduction(vga, None, [((224, 224), False)]) == 2  # 320×240 still covers 224×224
    assert jpeg_reduction(vga, None, [((112, 112), False)]) == 4
    assert jpeg_reduction(vga, None, [((448, 448), True)]) == 1  # the letterbox keeps 448×336
    assert jpeg_reduction(vga, None, [((224, 224), True)]) == 2  # keeps 224×168
    assert jpeg_reduction(vga, None, [((224, 224), False), ((448, 448), True)]) == 1  # every task must fit
    assert jpeg_reduction(vga, (0, 0, 640, 480), [((224, 224), False)]) == 2
    assert jpeg_reduction(vga, (100, 60, 400, 300), [((224, 224), False)]) == 1  # 200×150 < 224
    assert jpeg_reduction(vga, (101, 60, 560, 400), [((224, 224), False)]) == 1  # odd x: not exact
    assert jpeg_reduction(vga, (400, 300, 400, 300), [((64, 64), False)]) == 1  # beyond the frame: clipped
    assert jpeg_reduction((481, 640), None, [((224, 224), False)]) == 1
    assert jpeg_reduction(vga, None, []) == 1


@pytest.mark.parametrize("task,size,roi", [("classify", (224, 224), None), ("detect", (224, 224), None),
                                           ("classify", (112, 112), (64, 32, 320, 256)),
                                           ("segment", (128, 128), (64, 32, 320, 256))])
def test_a_reduced_decode_gives_the_same_letterbox_and_roi_and_close_pixels(task, size, roi):
    from shared.config import CameraConfig
    from shared.data.scenes import scene_from_source
    from shared.imaging import jpeg_reduction
    from shared.messages import Frame
    from shared.prepare import SPATIAL, prepare

    img, _ = scene_from_source("synthetic://surface?w=640&h=480&seed=3").render(0)
    enc, data = encode(img, 95)
    frame = Frame(camera="c", seq=0, ts=0, enc=enc, shape=img.shape, dtype="uint8", data=data)
    cam = CameraConfig(id="c", source="synthetic://surface", tasks=[task], roi=roi)
    k = jpeg_reduction(frame.shape[:2], cam.roi, [(size, task in SPATIAL)])
    assert k >= 2
    small = decode_frame(frame, k)
    assert small.shape == (480 // k, 640 // k, 3)
    full_img, full_lb, full_roi = prepare(decode_frame(frame), cam, task, size)
    red_img, red_lb, red_roi = prepare(small, cam, task, size, k)
    assert red_lb == full_lb and red_roi == full_roi  # boxes and masks map back exactly as before
    assert red_img.shape == full_img.shape
    assert np.abs(red_img.astype(int) - full_img).mean() < 3  # a different route to nearly the same pixels


def test_a_reduced_decode_refuses_what_it_cannot_shrink():
    from shared.messages import Frame

    img = np.zeros((48, 64, 3), np.uint8)
    png = Frame(camera="c", seq=0, ts=0, enc="png", shape=img.shape, dtype="uint8", data=encode(img[:, :, :1])[1])
    with pytest.raises(ValueError, match="cannot reduce a png"):
        decode_frame(png, 2)
    bad = Frame(camera="c", seq=1, ts=0, enc="jpeg", shape=img.shape, dtype="uint8", data=b"\xff\xd8junk")
    with pytest.raises(DecodeError, match="c#1: jpeg bytes do not decode to a 64x48 image"):
        decode_frame(bad, 2)


# --- the one JPEG decoder (libjpeg-turbo through simplejpeg) -------------------------------------------
@pytest.mark.parametrize("name", sorted(JPEG_PSNR))
def test_the_jpeg_decoder_gives_opencvs_pixels_at_every_reduction(shared_data, name):
    from shared.imaging import decode_jpeg

    data = (shared_data / name).read_bytes()  # the photos as they are: 4:2:0 and 4:2:2, odd sizes
    buf = np.frombuffer(data, np.uint8)
    flags = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
             8: cv2.IMREAD_REDUCED_COLOR_8}
    hw = cv2.imdecode(buf, cv2.IMREAD_COLOR).shape[:2]
    for k, flag in flags.items():
        want = cv2.cvtColor(cv2.imdecode(buf, flag), cv2.COLOR_BGR2RGB)
        got = decode_jpeg(data, hw, k)
        assert got.shape == want.shape, (k, got.shape, want.shape)
        assert np.array_equal(got, want), (k, int(np.abs(got.astype(int) - want).max()))


def test_the_jpeg_decoder_says_none_for_what_is_not_a_whole_jpeg(shared_data):
    from shared.imaging import decode_jpeg

    data = (shared_data / "baboon.jpg").read_bytes()
    for bad in (b"", b"not a jpeg", data[: len(data) // 2], data[:-200], b"\x89PNG\r\n\x1a\n" + bytes(64)):
        assert decode_jpeg(bad) is None
        assert decode_jpeg(bad, (512, 512), 2) is None
    with pytest.raises(ValueError, match="reduce 3 needs one of"):
        decode_jpeg(data, (512, 512), 3)


@pytest.mark.parametrize("dtype,channels", [(np.uint8, 3), (np.uint8, 1), (np.uint16, 1)])
def test_letterbox_and_stretch_write_into_a_batch_row_as_they_would_alone(dtype, channels):
    image = np.random.default_rng(1).integers(0, 200, (240, 320, channels)).astype(dtype)
    batch = np.full((3, 224, 224, channels), 77, dtype)  # a reused buffer: the last batch's pixels
    boxed, lb = letterbox(image, (224, 224), fill=9)
    boxed_in, lb_in = letterbox(image, (224, 224), fill=9, out=batch[1])
    assert lb_in == lb and boxed_in.base is batch
    stretched, sc = stretch(image, (224, 224))
    stretched_in, sc_in = stretch(image, (224, 224), out=batch[2])
    assert sc_in == sc and stretched_in.base is batch
    assert np.array_equal(batch[1], boxed) and np.array_equal(batch[2], stretched)
    assert (batch[0] == 77).all()  # the other rows are left alone
