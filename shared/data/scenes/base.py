"""What every synthetic scene shares: the ``Scene`` base class, the registry and the seed hashing.

A scene draws every random number from a generator or hash seeded by ``(seed, scene name, ...)``
(``mix``, ``unit``, ``Scene._rng``), never from global state, so a frame depends on nothing but
its scene, seed and ``seq``. ``make_scene`` and ``scene_from_source`` look scenes up in
``SCENE_TYPES``, which the package fills by importing every scene module.
"""

from __future__ import annotations

import math
import zlib
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import cv2
import numpy as np

SCENES = ("process", "equipment", "surface", "thermal")
EPISODE_BLOCK = 20
MIN_SIZE = 32

_M64 = (1 << 64) - 1


def mix(*vals: int | str) -> int:
    """A 64-bit hash of ints/strings, stable across runs and platforms (splitmix64 chain)."""
    h = 0x9E3779B97F4A7C15
    for v in vals:
        if isinstance(v, str):
            v = zlib.crc32(v.encode())
        h = (h ^ (int(v) & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


def unit(*vals: int | str) -> float:
    """A float in [0, 1) hashed from ``vals``."""
    return (mix(*vals) >> 11) / float(1 << 53)


class Scene:
    """Base of the scenes; subclasses set ``name``, ``default_size`` and implement ``_render``."""

    name: str = ""
    default_size: tuple[int, int] = (320, 240)  # (width, height)
    classes: tuple[str, ...] = ()
    kinds: tuple[str, ...] = ()  # anomaly kinds an episode can show

    def __init__(self, width: int | None = None, height: int | None = None, seed: int = 0,
                 anomaly_rate: float = 0.1):
        dw, dh = self.default_size
        if width is None and height is None:
            width, height = dw, dh
        elif height is None:
            height = round(int(width) * dh / dw)
        elif width is None:
            width = round(int(height) * dw / dh)
        width, height = int(width), int(height)
        if width < MIN_SIZE or height < MIN_SIZE or width > 8192 or height > 8192:
            raise ValueError(f"synthetic scene {self.name!r}: size {width}x{height} is outside "
                             f"{MIN_SIZE}..8192 pixels per side")
        rate = float(anomaly_rate)
        if not 0.0 <= rate <= 1.0 or math.isnan(rate):
            raise ValueError(f"synthetic scene {self.name!r}: anomaly_rate {anomaly_rate!r} is not within 0..1")
        self.width, self.height = width, height
        self.seed = int(seed)
        self.anomaly_rate = rate
        self._setup()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(width={self.width}, height={self.height}, seed={self.seed}, "
                f"anomaly_rate={self.anomaly_rate:g})")

    # --- episodes ----------------------------------------------------------------------
    def _episode_shape(self) -> tuple[float, int]:
        """(fraction of blocks holding an episode, episode length in frames)."""
        r = self.anomaly_rate
        if r <= 0.5:
            return 2.0 * r, EPISODE_BLOCK // 2
        return 1.0, max(EPISODE_BLOCK // 2, min(EPISODE_BLOCK, round(EPISODE_BLOCK * r)))

    def episode(self, seq: int) -> tuple[int, int, int] | None:
        """``(block, first_seq, length)`` of the anomaly episode that ``seq`` belongs to, else None."""
        if self.anomaly_rate <= 0.0:
            return None
        q, length = self._episode_shape()
        block, pos = divmod(seq, EPISODE_BLOCK)
        phase = unit(self.seed, self.name, "phase")
        if math.floor((block + 1) * q + phase) <= math.floor(block * q + phase):
            return None
        start = int(unit(self.seed, self.name, block, "start") * (EPISODE_BLOCK - length + 1))
        if start <= pos < start + length:
            return block, block * EPISODE_BLOCK + start, length
        return None

    def anomalous(self, seq: int) -> bool:
        return self.episode(seq) is not None

    def episode_kind(self, block: int) -> str:
        return self.kinds[mix(self.seed, self.name, block, "kind") % len(self.kinds)]

    # --- helpers -----------------------------------------------------------------------
    def _rng(self, *vals: int | str) -> np.random.Generator:
        return np.random.default_rng(mix(self.seed, self.name, *vals))

    def _noise_tables(self, sigma: float, channels: int = 3, pad: int = 64) -> None:
        """Seed-only sensor noise as saturating add/subtract tables; a frame takes a hashed window."""
        rng = self._rng("noise")
        shape = (self.height + pad, self.width + pad) + ((channels,) if channels > 1 else ())
        n = rng.normal(0.0, sigma, shape).astype(np.float32)
        self._npos = np.clip(n, 0, 255).astype(np.uint8)
        self._nneg = np.clip(-n, 0, 255).astype(np.uint8)
        self._npad = pad

    def _add_noise(self, img: np.ndarray, seq: int) -> np.ndarray:
        h = mix(self.seed, self.name, seq, "noise-window")
        ox, oy = h % self._npad, (h >> 20) % self._npad
        win = (slice(oy, oy + self.height), slice(ox, ox + self.width))
        img = cv2.add(img, self._npos[win])
        return cv2.subtract(img, self._nneg[win])

    def _setup(self) -> None:  # seed-only precomputation
        pass

    def _render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        raise NotImplementedError

    def render(self, seq: int) -> tuple[np.ndarray, dict[str, Any]]:
        """``(image, truth)`` of frame ``seq`` (an int >= 0); the same inputs give identical output."""
        if isinstance(seq, bool) or not isinstance(seq, (int, np.integer)) or seq < 0:
            raise ValueError(f"synthetic scene {self.name!r}: seq must be an int >= 0, not {seq!r}")
        return self._render(int(seq))


SCENE_TYPES: dict[str, type[Scene]] = {}


def register(cls: type[Scene]) -> type[Scene]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no scene name")
    SCENE_TYPES[cls.name] = cls
    return cls


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: int, wrap_x: bool = False) -> np.ndarray:
    """Float32 noise in about -1..1 with features of ``cell`` pixels; periodic in x when ``wrap_x``."""
    gh, gw = max(2, h // cell + 2), max(2, w // cell + 2)
    g = rng.standard_normal((gh, gw)).astype(np.float32)
    if wrap_x:
        gw = max(2, round(w / cell))
        g = rng.standard_normal((gh, gw)).astype(np.float32)
        big = cv2.resize(np.tile(g, (1, 3)), (3 * w, h), interpolation=cv2.INTER_CUBIC)
        out = big[:, w:2 * w]
    else:
        out = cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)
    return np.ascontiguousarray(out)


def make_scene(name: str, **kw: Any) -> Scene:
    """The scene called ``name`` (one of ``SCENES``) built with ``width``/``height``/``seed``/``anomaly_rate``."""
    cls = SCENE_TYPES.get(name)
    if cls is None:
        raise ValueError(f"unknown synthetic scene {name!r}; known scenes: {', '.join(SCENE_TYPES)}")
    return cls(**kw)


_QUERY_KEYS = {"w": "width", "width": "width", "h": "height", "height": "height", "seed": "seed",
               "anomaly": "anomaly_rate", "anomaly_rate": "anomaly_rate"}


def scene_from_source(source: str, **kw: Any) -> Scene:
    """The scene of ``synthetic://<scene>[?w=320&h=240&seed=3&anomaly=0.2]``.

    ``kw`` gives defaults (``width``, ``height``, ``seed``, ``anomaly_rate``); the query overrides them.
    Raises ValueError naming the source and what is wrong with it.
    """
    parts = urlsplit(source.strip())
    if parts.scheme.lower() != "synthetic":
        raise ValueError(f"{source!r} is not a synthetic source (synthetic://<scene>)")
    name = (parts.netloc or parts.path.lstrip("/")).strip().lower()
    args = dict(kw)
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        field = _QUERY_KEYS.get(key.lower())
        if field is None:
            raise ValueError(f"{source!r}: unknown query parameter {key!r} (known: w, h, seed, anomaly)")
        try:
            args[field] = float(value) if field == "anomaly_rate" else int(value)
        except ValueError:
            raise ValueError(f"{source!r}: {key}={value!r} is not a number") from None
    try:
        return make_scene(name, **args)
    except ValueError as e:
        raise ValueError(f"{source!r}: {e}") from None
