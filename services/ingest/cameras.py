"""Camera sources for ingest: one class per kind of source, registered in ``SOURCE_TYPES``.

The source string decides the kind (``classify_source``):

===========  =====================================================  =====
kind         source                                                 live
===========  =====================================================  =====
synthetic    ``synthetic://<scene>[?w=..&h=..&seed=..&anomaly=..]``  no
             (``&replay=N``: render N frames once, then send their
             encoded bytes over and over, as a camera that encodes
             on board would; for benchmarks)
file         a video file (``file://`` allowed)                     no
folder       a folder of images (jpg, jpeg, png, bmp, tif, tiff)    no
stream       ``rtsp://``, ``rtsps://``, ``http://``, ``https://``   yes
usb          ``/dev/videoN`` or a device index such as ``0``         yes
===========  =====================================================  =====

``read()`` gives RGB ``uint8`` H×W×3, or radiometric ``uint16`` H×W×1 (thermal scenes, 16-bit
single-channel images), or an ``Encoded`` frame (bytes a camera already encoded, which ingest
forwards untouched); ``None`` once a finite source (file, folder with ``loop=False``) has ended.
Every failure is a ``SourceError`` whose message names the source; the caller closes the source,
waits ``Backoff.next()`` seconds and opens it again.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import cv2
import numpy as np

from shared.data.scenes import scene_from_source
from shared.imaging import decode_jpeg, encode

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
STREAM_SCHEMES = ("rtsp", "rtsps", "http", "https")
OPEN_TIMEOUT_MS = 10_000
READ_TIMEOUT_MS = 10_000


class SourceError(Exception):
    """A camera source cannot be opened or read; the message names the source and the reason."""


@dataclass(frozen=True)
class Encoded:
    """A frame the source already has encoded (JPEG for 8-bit colour, PNG otherwise): ingest sends
    ``data`` as it is instead of decoding and encoding again."""

    enc: str
    data: bytes
    shape: tuple[int, ...]
    dtype: str

    def thumbnail(self) -> np.ndarray | None:
        """A small decoded picture for the frozen/black checks (1/8 size for JPEG: libjpeg skips most of
        the IDCT, though not the entropy decoding, about 0.55 of a full decode); None when the bytes do
        not decode."""
        if self.enc == "jpeg":
            return decode_jpeg(self.data, self.shape[:2], 8)
        image = cv2.imdecode(np.frombuffer(self.data, np.uint8), cv2.IMREAD_UNCHANGED)
        return image[:, :, None] if image is not None and image.ndim == 2 else image

    @classmethod
    def of(cls, image: np.ndarray, quality: int = 90) -> "Encoded":
        enc, data = encode(image, quality)
        return cls(enc, data, tuple(image.shape), str(image.dtype))


class CameraSource:
    """Base of the camera sources. A subclass sets ``kind`` and ``live`` and is decorated with ``@register``."""

    kind: str = ""
    live: bool = False  # True: the device paces itself; False: the reader paces to ``fps``

    def __init__(self, source: str, *, fps: float, loop: bool = True):
        try:
            fps = float(fps)
        except (TypeError, ValueError):
            fps = float("nan")
        if not fps > 0:
            raise SourceError(f"camera source {source!r}: fps must be a number > 0, not {fps!r}")
        self.source, self.fps, self.loop = source, fps, bool(loop)
        self.frames_read = 0  # frames returned since this object was made

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, fps={self.fps:g}, loop={self.loop})"

    def __enter__(self) -> "CameraSource":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _error(self, what: str) -> SourceError:
        return SourceError(f"{self.kind} camera source {self.source!r}: {what}")

    def open(self) -> None:
        raise NotImplementedError

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the source; safe to call at any time, also twice or before ``open``."""


SOURCE_TYPES: dict[str, type[CameraSource]] = {}


def register(cls: type[CameraSource]) -> type[CameraSource]:
    if not cls.kind:
        raise TypeError(f"{cls.__name__} has no kind")
    SOURCE_TYPES[cls.kind] = cls
    return cls


# --- classification -------------------------------------------------------------------------
_USB = re.compile(r"^(?:/dev/video(\d+)|(\d+))$")


def _local_path(source: str) -> str:
    return source[len("file://"):] if source.lower().startswith("file://") else source


def classify_source(source: str) -> str:
    """``"synthetic"``, ``"stream"``, ``"usb"``, ``"folder"`` or ``"file"`` for a source string.

    A path that is an existing directory is a folder; any other path is a file (a missing one
    fails at ``open``). Raises SourceError for an empty source or an unknown URL scheme.
    """
    s = (source or "").strip() if isinstance(source, str) else ""
    if not s:
        raise SourceError(f"camera source {source!r}: empty; give a URL, device, file, folder or synthetic://<scene>")
    m = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", s)
    if m:
        scheme = m.group(1).lower()
        if scheme == "synthetic":
            return "synthetic"
        if scheme in STREAM_SCHEMES:
            return "stream"
        if scheme != "file":
            raise SourceError(f"camera source {source!r}: unknown scheme {scheme}:// "
                              f"(known: synthetic, file, {', '.join(STREAM_SCHEMES)})")
    if _USB.match(s):
        return "usb"
    return "folder" if Path(_local_path(s)).expanduser().is_dir() else "file"


def open_source(source: str, *, fps: float, loop: bool = True) -> CameraSource:
    """The source object for ``source`` (not opened yet: call ``open()``)."""
    return SOURCE_TYPES[classify_source(source)](source.strip(), fps=fps, loop=loop)


# --- pixel conversion ---------------------------------------------------------------------
def to_rgb(image: np.ndarray, what: Callable[[], str]) -> np.ndarray:
    """OpenCV's BGR/BGRA/gray (8 or 16 bit) as RGB uint8 H×W×3; 16-bit single channel stays uint16 H×W×1."""
    if image.dtype not in (np.uint8, np.uint16):
        raise SourceError(f"{what()}: unsupported pixel type {image.dtype} (need 8- or 16-bit)")
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        if image.dtype == np.uint16:
            return image[:, :, None]
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise SourceError(f"{what()}: unsupported image shape {list(image.shape)}")
    if image.dtype == np.uint16:  # 16-bit colour: keep the top 8 bits
        image = (image >> 8).astype(np.uint8)
    code = cv2.COLOR_BGR2RGB if image.shape[2] == 3 else cv2.COLOR_BGRA2RGB
    return cv2.cvtColor(image, code)


# --- synthetic --------------------------------------------------------------------------
@register
class SyntheticSource(CameraSource):
    """Frames ``scene.render(0)``, ``render(1)``, …; the count goes on across reopenings.

    With ``replay=N`` in the query the first N frames are rendered and encoded once, at ``open``, and
    ``read`` gives their ``Encoded`` bytes in a loop: the cost of a real camera to ingest (bytes in,
    bytes out), without the renderer's, which is what ``plantsight bench`` needs to measure the pipeline.
    """

    kind = "synthetic"
    live = False
    MAX_REPLAY = 1000

    def __init__(self, source: str, *, fps: float, loop: bool = True):
        super().__init__(source, fps=fps, loop=loop)
        self.scene = None
        self.seq = 0
        self.truth: dict | None = None  # truth of the last frame read
        self.replay: list[Encoded] = []
        parts = urlsplit(source.strip())
        query = parse_qsl(parts.query, keep_blank_values=True)
        self.replay_n = 0
        for key, value in query:
            if key.lower() == "replay":
                if not value.isdigit() or not 1 <= int(value) <= self.MAX_REPLAY:
                    raise SourceError(f"synthetic camera source {source!r}: replay={value!r} must be a whole "
                                      f"number of frames from 1 to {self.MAX_REPLAY}")
                self.replay_n = int(value)
        self.scene_source = urlunsplit(parts._replace(query=urlencode(
            [(k, v) for k, v in query if k.lower() != "replay"])))

    def open(self) -> None:
        try:
            self.scene = scene_from_source(self.scene_source)
        except ValueError as e:
            raise SourceError(f"synthetic camera source: {e}") from None
        if self.replay_n and not self.replay:
            self.replay = [Encoded.of(self.scene.render(i)[0]) for i in range(self.replay_n)]

    def read(self) -> np.ndarray | Encoded:
        if self.scene is None:
            raise self._error("read before open")
        if self.replay:
            image = self.replay[self.seq % len(self.replay)]
        else:
            image, self.truth = self.scene.render(self.seq)
        self.seq += 1
        self.frames_read += 1
        return image

    def close(self) -> None:
        self.scene = None


# --- video file ---------------------------------------------------------------------------
@register
class FileSource(CameraSource):
    """A video file; at its end it starts again (``loop``) or reads None."""

    kind = "file"
    live = False

    def __init__(self, source: str, *, fps: float, loop: bool = True):
        super().__init__(source, fps=fps, loop=loop)
        self.path = Path(_local_path(source)).expanduser()
        self.cap: cv2.VideoCapture | None = None
        self.ended = False
        self.pass_frames = 0  # frames read since the file was (re)started

    def _capture(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise self._error(f"cannot open {str(self.path)!r} as a video")
        return cap

    def open(self) -> None:
        self.close()
        if not self.path.exists():
            raise self._error(f"no such file or folder: {str(self.path)!r}")
        if not self.path.is_file():
            raise self._error(f"{str(self.path)!r} is not a file")
        self.cap = self._capture()
        self.ended, self.pass_frames = False, 0

    def read(self) -> np.ndarray | None:
        if self.ended:
            return None
        if self.cap is None:
            raise self._error("read before open")
        ok, frame = self.cap.read()
        if not ok or frame is None:
            if self.pass_frames == 0:
                raise self._error(f"no frame could be decoded from {str(self.path)!r}")
            if not self.loop:
                self.ended = True
                self.close()
                return None
            self.cap.release()  # reopen rather than seek: decoders seek unreliably, a reopen is exact
            self.cap = None
            self.cap = self._capture()
            self.pass_frames = 0
            ok, frame = self.cap.read()
            if not ok or frame is None:
                raise self._error(f"no frame could be decoded from {str(self.path)!r} after rewinding")
        self.pass_frames += 1
        self.frames_read += 1
        return to_rgb(frame, lambda: f"{self.kind} camera source {self.source!r}")

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


# --- folder of images -----------------------------------------------------------------------
@register
class FolderSource(CameraSource):
    """The folder's images in sorted file-name order; the list is read again at each new pass."""

    kind = "folder"
    live = False

    def __init__(self, source: str, *, fps: float, loop: bool = True):
        super().__init__(source, fps=fps, loop=loop)
        self.path = Path(_local_path(source)).expanduser()
        self.files: list[Path] = []
        self.index = 0
        self.ended = False
        self.opened = False

    def _scan(self) -> list[Path]:
        try:
            files = sorted(p for p in self.path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        except OSError as e:
            raise self._error(f"cannot list {str(self.path)!r}: {e.strerror or e}") from None
        if not files:
            raise self._error(f"no images ({', '.join(s[1:] for s in IMAGE_SUFFIXES)}) in {str(self.path)!r}")
        return files

    def open(self) -> None:
        if not self.path.is_dir():
            raise self._error(f"no such folder: {str(self.path)!r}")
        self.files, self.index, self.ended, self.opened = self._scan(), 0, False, True

    def read(self) -> np.ndarray | None:
        if self.ended:
            return None
        if not self.opened:
            raise self._error("read before open")
        if self.index >= len(self.files):
            if not self.loop:
                self.ended = True
                return None
            self.files, self.index = self._scan(), 0
        path = self.files[self.index]
        self.index += 1
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if image is None:
            raise self._error(f"cannot read image {str(path)!r} (missing, unreadable or not an image)")
        self.frames_read += 1
        return to_rgb(image, lambda: f"{self.kind} camera source {self.source!r}: image {str(path)!r}")

    def close(self) -> None:
        self.opened = False


# --- live devices -------------------------------------------------------------------------
class _LiveSource(CameraSource):
    live = True

    def __init__(self, source: str, *, fps: float, loop: bool = True):
        super().__init__(source, fps=fps, loop=loop)
        self.cap: cv2.VideoCapture | None = None

    def _make_capture(self) -> cv2.VideoCapture:
        raise NotImplementedError

    def open(self) -> None:
        self.close()
        try:
            cap = self._make_capture()
        except cv2.error as e:
            raise self._error(f"cannot open: {e}") from None
        if not cap.isOpened():
            cap.release()
            raise self._error("cannot open (unreachable, refused, or no such device)")
        try:
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the freshest frame, not a queue of old ones
        except cv2.error:
            pass
        self.cap = cap

    def read(self) -> np.ndarray:
        if self.cap is None:
            raise self._error("read before open")
        try:
            ok, frame = self.cap.read()
        except cv2.error as e:
            raise self._error(f"read failed: {e}") from None
        if not ok or frame is None:
            raise self._error("read failed (stream ended or device lost)")
        self.frames_read += 1
        return to_rgb(frame, lambda: f"{self.kind} camera source {self.source!r}")

    def close(self) -> None:
        if self.cap is not None:
            self.cap.release()
            self.cap = None


@register
class StreamSource(_LiveSource):
    """An RTSP or HTTP(S) stream through FFmpeg; RTSP goes over TCP unless
    ``OPENCV_FFMPEG_CAPTURE_OPTIONS`` says otherwise."""

    kind = "stream"

    def _make_capture(self) -> cv2.VideoCapture:
        if self.source.lower().startswith(("rtsp://", "rtsps://")):
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, OPEN_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, READ_TIMEOUT_MS]
        try:
            return cv2.VideoCapture(self.source, cv2.CAP_FFMPEG, params)
        except (TypeError, AttributeError):  # an OpenCV without open parameters
            return cv2.VideoCapture(self.source, cv2.CAP_FFMPEG)


@register
class UsbSource(_LiveSource):
    """A local camera: ``/dev/videoN`` or the device index ``N``."""

    kind = "usb"

    def _make_capture(self) -> cv2.VideoCapture:
        m = _USB.match(self.source.strip())
        if not m:
            raise self._error("not a device: give /dev/videoN or an index")
        return cv2.VideoCapture(int(m.group(1) or m.group(2)))


# --- reconnection ---------------------------------------------------------------------------
class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in ``[0, min(cap, base * 2**n)]``.

    ``next()`` gives the next delay in seconds and counts the attempt; ``reset()`` starts over
    (call it once a source is working again).
    """

    def __init__(self, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        if not base > 0 or not cap >= base:
            raise ValueError(f"Backoff needs 0 < base <= cap, got base={base!r} cap={cap!r}")
        self.base, self.cap = float(base), float(cap)
        self.rng = rng if rng is not None else random.Random()
        self.attempts = 0

    @property
    def ceiling(self) -> float:
        """The largest delay the next ``next()`` can give."""
        return min(self.cap, self.base * 2.0 ** min(self.attempts, 64))

    def next(self) -> float:
        delay = self.rng.uniform(0.0, self.ceiling)
        self.attempts += 1
        return delay

    def reset(self) -> None:
        self.attempts = 0
