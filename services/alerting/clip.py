"""The evidence clip: one camera's frames from ``{P}:frames`` over a time window, as MP4 (mp4v).

The window is taken on stream entry ids, which Redis stamps from its own clock. A clip is read in
pages as the frames arrive (so frames the stream trims later are already in the file) and is
complete once Redis' clock has passed the window's end: every later entry gets a larger id.
The file is written as ``.clip.tmp.mp4`` and renamed to ``clip.mp4`` only when complete.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import redis

from shared.messages import DecodeError
from shared.overlay import draw

CLIP, CLIP_TMP = "clip.mp4", ".clip.tmp.mp4"
PAGE = 200  # stream entries per XRANGE call
MAX_SIDE = 1280  # a 4K camera's clip is scaled down: evidence is kept for weeks
MAX_ID_SEQ = 18446744073709551615


@dataclass
class Clip:
    """A clip being recorded into ``directory``: its window, how far the stream was read, the open writer."""

    directory: Path
    camera: str
    start_ms: int
    end_ms: int
    fps: float
    kelvin: list | None = None  # one colour scale (K) for every thermal frame of the clip
    zones: dict = field(default_factory=dict)
    zone: str | None = None
    cursor: str | None = None  # last entry id read; None: start at start_ms
    size: tuple[int, int] | None = None  # (w, h), set by the first frame
    ids: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    writer: cv2.VideoWriter | None = field(default=None, repr=False)

    def advance(self, r: redis.Redis, stream: str, decode: Callable[[dict], np.ndarray]) -> bool:
        """Append the camera's frames after the cursor; True when the window has passed (call ``finish``)."""
        sec, usec = r.time()
        complete = sec * 1000 + usec // 1000 > self.end_ms  # read the clock first: no entry <= end_ms can follow
        cam = self.camera.encode()
        while True:
            lower = f"({self.cursor}" if self.cursor else f"{self.start_ms}-0"
            page = r.xrange(stream, lower, f"{self.end_ms}-{MAX_ID_SEQ}", count=PAGE)
            for entry_id, fields in page:
                self.cursor = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                if fields.get(b"cam") == cam:
                    self._append(self.cursor, fields, decode)
            if len(page) < PAGE:
                return complete

    def _append(self, entry_id: str, fields: dict, decode: Callable[[dict], np.ndarray]) -> None:
        try:
            picture = draw(decode(fields), {}, self.zones, self.zone, kelvin_range=self.kelvin)
        except (DecodeError, ValueError) as e:
            self.skipped.append(f"{entry_id}: {e}")
            return
        if self.size is None:
            h, w = picture.shape[:2]
            if max(h, w) > MAX_SIDE:
                h, w = round(h * MAX_SIDE / max(h, w)), round(w * MAX_SIDE / max(h, w))
            self.size = (max(2, w - w % 2), max(2, h - h % 2))  # MPEG-4 needs even sides
            tmp = self.directory / CLIP_TMP
            self.writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size)
            if not self.writer.isOpened():
                self.skipped.append(f"cannot open an mp4v writer for {tmp}")
                self.writer = None
        if self.writer is None:
            return
        if (picture.shape[1], picture.shape[0]) != self.size:
            picture = cv2.resize(picture, self.size, interpolation=cv2.INTER_AREA)
        self.writer.write(cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        self.ids.append(entry_id)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.release()
            self.writer = None

    def finish(self) -> None:
        """Close the file and rename it to clip.mp4 (or delete it when no frame was found); OSError passes."""
        self.close()
        tmp = self.directory / CLIP_TMP
        if self.ids:
            os.replace(tmp, self.directory / CLIP)
        else:
            tmp.unlink(missing_ok=True)

    def discard(self) -> None:
        self.close()
        (self.directory / CLIP_TMP).unlink(missing_ok=True)

    def facts(self, state: str) -> dict:
        """The clip's part of evidence.json; ``state``: recording, done or none."""
        out = {"state": state, "file": CLIP, "camera": self.camera, "from_ms": self.start_ms, "to_ms": self.end_ms,
               "fps": self.fps, "kelvin_range": self.kelvin, "frames": len(self.ids),
               "size": list(self.size) if self.size else None}
        if self.skipped:
            out["skipped"] = self.skipped[:20]
        return out

    @classmethod
    def resume(cls, directory: Path, facts: dict, zones: dict) -> "Clip":
        """The clip a stopped alert service left recording, to be read again from its window's start."""
        c = facts["clip"]
        zone = facts.get("zone")
        return cls(directory=directory, camera=str(c["camera"]), start_ms=int(c["from_ms"]), end_ms=int(c["to_ms"]),
                   fps=float(c["fps"]), kelvin=c.get("kelvin_range"), zone=zone,
                   zones={k: v for k, v in zones.items() if k == zone})
