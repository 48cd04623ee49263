"""Judged alerts as training data: ``plantsight dataset export``.

Every firing alert of one task that an operator gave a verdict (``{P}:alert-acks``, `shared.acks`) is
written in the layout ``plantsight train`` reads for that task (`shared.data.datasets`):

- classify: ``DIR/train/<class>/<alert id>.jpg``; a confirmed alert under the class the model said, a false
  alarm under the negative class;
- detect: ``DIR/images/train/<id>.jpg`` and ``DIR/labels/train/<id>.txt`` (the model's boxes for a confirmed
  alert, empty for a false alarm), ``DIR/data.yaml`` with the class names;
- segment: ``DIR/images/train/<id>.png`` and ``DIR/masks/train/<id>.png`` (the model's mask for a confirmed
  alert, empty for a false alarm).

The picture is the alert's frame as the camera sent it, read from ``{P}:frames`` by the alert's ``frame_id``,
and the model's answer is that frame's result of the task on ``{P}:results``. The evidence folder's
``snapshot.jpg`` is not used: it has the result drawn over it, and a network must not learn the drawing.
Both streams are trimmed, so an alert whose frame or result is gone is counted and listed, not exported.

``DIR/manifest.json`` lists every exported frame; a re-run skips the alerts already in it.
"""

from __future__ import annotations

import json
import os
import re
import time
from datetime import datetime, timezone
from pathlib import Path

import cv2
import numpy as np
import redis
import yaml

from shared import acks
from shared.imaging import decode_frame, is_colour_jpeg
from shared.keys import Keys
from shared.messages import Alert, DecodeError, Frame, Result
from shared.overlay import encode_jpeg

EXPORT_TASKS = ("classify", "detect", "segment")
MANIFEST = "manifest.json"
SPLIT = "train"
PAGE = 500  # stream entries per XRANGE call
RESULT_SCAN = 20000  # entries of {P}:results searched after a frame's id for its result
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class ExportError(ValueError):
    """Bad input to the export (task, time, folder); the message names it."""


def parse_since(when: str, now: float | None = None) -> float:
    """Unix seconds from a duration back from now (``24h``, ``7d``, ``30m``) or an ISO date/time (UTC if naive)."""
    now = time.time() if now is None else now
    m = DURATION.match(str(when))
    if m:
        return now - float(m.group(1)) * UNIT_S[m.group(2)]
    try:
        dt = datetime.fromisoformat(str(when).strip())
    except ValueError:
        raise ExportError(f"--since {when!r} is neither a duration (24h, 7d, 30m) nor an ISO date/time "
                          f"(2026-12-01 or 2026-12-01T08:00:00)") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def judged_alerts(r: redis.Redis, prefix: str, task: str, since: float) -> list[tuple[Alert, dict]]:
    """(alert, acknowledgement) of every firing alert of `task` on ``{P}:alerts`` since `since` with a verdict."""
    records = acks.acknowledgements(r, prefix)
    judged = {k: v for k, v in records.items() if isinstance(v, dict) and v.get("verdict") in acks.VERDICTS}
    out, seen = [], set()
    if not judged:
        return out
    key, lower = Keys(prefix).alerts, "-"
    while True:
        page = r.xrange(key, lower, "+", count=PAGE)
        for _, fields in page:
            try:
                alert = Alert.from_msgpack(fields.get(b"m", b""))
            except DecodeError:
                continue
            if (alert.state == "firing" and alert.task == task and alert.id in judged and alert.id not in seen
                    and alert.ts / 1e9 >= since):
                seen.add(alert.id)
                out.append((alert, judged[alert.id]))
        if len(page) < PAGE:
            return out
        lower = f"({_s(page[-1][0])}"


def read_frame(r: redis.Redis, keys: Keys, alert: Alert, max_bytes: int) -> Frame | None:
    """The alert's frame from ``{P}:frames``, or None when it is no longer there."""
    if not alert.frame_id:
        return None
    try:
        entries = r.xrange(keys.frames, alert.frame_id, alert.frame_id, count=1)
        return Frame.from_msgpack(entries[0][1][b"m"], max_bytes) if entries else None
    except (redis.ResponseError, DecodeError, KeyError):
        return None


def read_result(r: redis.Redis, keys: Keys, alert: Alert) -> Result | None:
    """The result of the alert's task for its frame: infer writes it after the frame, so the search starts there."""
    lower, seen = alert.frame_id, 0
    try:
        while seen < RESULT_SCAN:
            page = r.xrange(keys.results, lower, "+", count=PAGE)
            for _, fields in page:
                if _s(fields.get(b"task", b"")) not in ("", alert.task):
                    continue
                try:
                    res = Result.from_msgpack(fields.get(b"m", b""))
                except DecodeError:
                    continue
                if res.frame_id == alert.frame_id and res.task == alert.task and res.camera == alert.camera:
                    return res
            if len(page) < PAGE:
                return None
            seen += len(page)
            lower = f"({_s(page[-1][0])}"
    except redis.ResponseError:
        return None
    return None


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _png(image: np.ndarray) -> bytes:
    a = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 and image.shape[2] == 3 else image
    ok, buf = cv2.imencode(".png", a)
    if not ok:
        raise ValueError(f"cannot encode a {a.dtype} {list(a.shape)} image as PNG")
    return buf.tobytes()


def _rgb(frame: Frame) -> np.ndarray:
    image = decode_frame(frame)
    if image.dtype != np.uint8:
        raise ValueError(f"frame is {image.dtype}, not an 8-bit picture")
    return np.repeat(image, 3, axis=2) if image.ndim == 3 and image.shape[2] == 1 else image


def _jpeg(frame: Frame) -> bytes:
    """The camera's own JPEG when it sent one (no second compression), else the frame encoded as JPEG."""
    return bytes(frame.data) if is_colour_jpeg(frame) else encode_jpeg(_rgb(frame), 95)


class Exporter:
    """Writes one task's judged alerts into DIR; `names` are detect's classes, kept in data.yaml."""

    def __init__(self, task: str, out: Path, negative_class: str):
        self.task, self.out, self.negative = task, out, negative_class
        self.names: list[str] = []
        if task == "detect" and (out / "data.yaml").is_file():
            data = yaml.safe_load((out / "data.yaml").read_text(encoding="utf-8")) or {}
            names = data.get("names") if isinstance(data, dict) else None
            if isinstance(names, dict):
                names = [names[k] for k in sorted(names)]
            if not isinstance(names, list):
                raise ExportError(f"{out / 'data.yaml'}: 'names' must be a list of class names")
            self.names = [str(n) for n in names]

    def write(self, alert: Alert, verdict: str, frame: Frame, result: Result) -> list[str]:
        """The paths written for one alert, relative to DIR."""
        return getattr(self, f"_{self.task}")(alert.id, verdict == "confirmed", frame, result)

    def _classify(self, stem: str, confirmed: bool, frame: Frame, result: Result) -> list[str]:
        label = str(result.out.get("label") or "") if confirmed else self.negative
        if not label or label in (".", "..") or "/" in label or "\\" in label:
            raise ValueError(f"the result's label {label!r} cannot name a class folder")
        rel = f"{SPLIT}/{label}/{stem}.jpg"
        _write(self.out / rel, _jpeg(frame))
        return [rel]

    def _detect(self, stem: str, confirmed: bool, frame: Frame, result: Result) -> list[str]:
        h, w = int(frame.shape[0]), int(frame.shape[1])
        lines = []
        classes = [str(c) for c in result.out.get("classes") or []]
        self.names += [c for c in classes if c not in self.names]  # the model's order, so its indices carry over
        if confirmed:
            for box in result.out.get("boxes") or []:
                x1, y1, x2, y2, _score, cls = box[:6]
                name = classes[int(cls)] if 0 <= int(cls) < len(classes) else str(int(cls))
                if name not in self.names:
                    self.names.append(name)
                x1, x2 = min(max(x1, 0.0), w), min(max(x2, 0.0), w)
                y1, y2 = min(max(y1, 0.0), h), min(max(y2, 0.0), h)
                if x2 <= x1 or y2 <= y1:
                    continue
                lines.append(f"{self.names.index(name)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} "
                             f"{(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}")
        image, label = f"images/{SPLIT}/{stem}.jpg", f"labels/{SPLIT}/{stem}.txt"
        _write(self.out / image, _jpeg(frame))
        _write(self.out / label, "".join(f"{line}\n" for line in lines).encode())
        return [image, label]

    def _segment(self, stem: str, confirmed: bool, frame: Frame, result: Result) -> list[str]:
        picture = _rgb(frame)
        mask = np.zeros(picture.shape[:2], np.uint8)
        if confirmed:
            raw = np.frombuffer(result.out.get("mask") or b"", np.uint8)
            got = cv2.imdecode(raw, cv2.IMREAD_GRAYSCALE) if raw.size else None
            if got is None:
                raise ValueError("the result carries no readable mask")
            if got.shape != mask.shape:
                got = cv2.resize(got, (mask.shape[1], mask.shape[0]), interpolation=cv2.INTER_NEAREST)
            mask = np.where(got > 0, 255, 0).astype(np.uint8)
        image, mask_rel = f"images/{SPLIT}/{stem}.png", f"masks/{SPLIT}/{stem}.png"
        _write(self.out / image, _png(picture))
        _write(self.out / mask_rel, _png(mask))
        return [image, mask_rel]

    def finish(self) -> None:
        if self.task == "detect" and self.names:
            _write(self.out / "data.yaml",
                   yaml.safe_dump({"path": ".", "train": f"images/{SPLIT}", "nc": len(self.names),
                                   "names": self.names}, sort_keys=False).encode())


def load_manifest(out: Path, task: str) -> dict:
    path = out / MANIFEST
    if not path.is_file():
        return {"task": task, "items": []}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{path}: not a readable manifest ({e})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("items"), list):
        raise ExportError(f"{path}: not a manifest of plantsight dataset export (no 'items' list)")
    if manifest.get("task") != task:
        raise ExportError(f"{path}: this folder holds a {manifest.get('task')!r} export, not {task!r}")
    return manifest


def export(r: redis.Redis, prefix: str, task: str, since: float, out, *, negative_class: str = "normal",
           max_message_bytes: int = 32 * 1024 * 1024) -> dict:
    """Export `task`'s judged alerts since `since` (unix seconds) into `out`; returns the summary.

    Summary: ``added``, ``already``, ``without_evidence`` (counts), ``added_ids``, ``missing`` (alert id and
    what is gone), ``task``, ``out``.
    """
    if task not in EXPORT_TASKS:
        raise ExportError(f"task {task!r} has no export layout; one of: {', '.join(EXPORT_TASKS)}")
    negative_class = str(negative_class)
    if not negative_class or negative_class in (".", "..") or "/" in negative_class or "\\" in negative_class:
        raise ExportError(f"--negative-class {negative_class!r} cannot name a class folder")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is not a folder")
    manifest = load_manifest(out, task)
    done = {item.get("alert_id") for item in manifest["items"] if isinstance(item, dict)}
    keys = Keys(prefix)
    exporter = Exporter(task, out, negative_class)
    added, already, missing = [], 0, []
    for alert, ack in judged_alerts(r, prefix, task, since):
        if alert.id in done:
            already += 1
            continue
        frame = read_frame(r, keys, alert, max_message_bytes)
        result = read_result(r, keys, alert) if frame is not None else None
        if frame is None or result is None:
            gone = f"frame {alert.frame_id or '(none)'} is no longer in {keys.frames}" if frame is None else \
                f"the {task} result of frame {alert.frame_id} is no longer in {keys.results}"
            missing.append({"id": alert.id, "reason": gone})
            continue
        try:
            files = exporter.write(alert, ack["verdict"], frame, result)
        except (ValueError, DecodeError) as e:
            missing.append({"id": alert.id, "reason": str(e)})
            continue
        manifest["items"].append({
            "alert_id": alert.id, "camera": alert.camera, "rule": alert.rule, "model": result.model or None,
            "verdict": ack["verdict"], "by": ack.get("by"), "at": ack.get("at"), "frame_id": alert.frame_id,
            "files": files})
        added.append(alert.id)
    exporter.finish()
    if added or not (out / MANIFEST).is_file():
        _write(out / MANIFEST, json.dumps(manifest, indent=2).encode())
    return {"task": task, "out": str(out), "added": len(added), "already": already,
            "without_evidence": len(missing), "added_ids": added, "missing": missing}
