"""Evidence for a firing alert: the picture that proves it, a clip around it, and the facts to trust it.

Written before the alert goes on ``{P}:alerts``, in ``<alerts.evidence_dir>/<alert id>/``:

- ``snapshot.jpg``: the alert's frame from ``{P}:frames`` with ``shared.overlay.draw`` of the result,
  the alert's zone outlined and, for the classifier, its Grad-CAM map;
- ``clip.mp4``: the camera's frames still in ``{P}:frames`` from ``clip_before_s`` before the frame to
  ``clip_after_s`` after it (window taken on the stream entry ids, i.e. Redis' clock);
- ``evidence.json``: the alert, its rule, threshold and value, the frame ids used, the model
  ``name@version``, the sha256 of the effective (masked) config, the files, and what is missing.

The clip's after part is still in the future when the alert fires: ``finish()``, called every step of
the alert service, appends frames as they arrive and closes the clip once Redis' clock has passed the
window (no later entry can then fall inside it). A missing frame, a trimmed stream, an unloadable
model or a failing disk never raises here: the alert must still go out, and evidence.json says what is
missing. Only an alert id that is not a canonical uuid is refused (EvidenceError), as it names a path.
One EvidenceStore belongs to one alert-service thread; it is not thread-safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import redis

from services.alerting.clip import CLIP, CLIP_TMP, Clip
from shared.config import Config
from shared.imaging import decode_frame, stretch
from shared.keys import Keys
from shared.messages import Alert, DecodeError, Frame, Result
from shared.overlay import draw, encode_jpeg
from shared.streams.connection import REDIS_DOWN
from shared.streams.groups import parse_id

log = logging.getLogger("plantsight.evidence")

SNAPSHOT, FACTS = "snapshot.jpg", "evidence.json"
PAGE = 200  # stream entries per XREVRANGE call
LATEST_SCAN = 5000  # entries searched back for a camera's latest frame (health alerts)
JPEG_QUALITY = 85
MIB = 1024 * 1024


class EvidenceError(ValueError):
    """An alert id that cannot name an evidence directory."""


def check_id(alert_id: str) -> str:
    """``alert_id`` when it is a canonical lower-case uuid (so it can name a directory), else EvidenceError."""
    try:
        ok = isinstance(alert_id, str) and str(uuid.UUID(alert_id)) == alert_id
    except ValueError:
        ok = False
    if not ok:
        raise EvidenceError(f"alert id {alert_id!r} is not a canonical uuid; it cannot name an evidence directory")
    return alert_id


def write_atomic(path: Path, data: bytes) -> None:
    """Readers see the old file or the whole new one, never half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def config_sha256(cfg: Config) -> str:
    """Hash of the effective config with secrets masked: two alerts with the same hash ran the same setup."""
    text = json.dumps(cfg.masked(), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def zones_of(cfg: Config, camera: str) -> dict[str, list]:
    """name -> polygon [[x, y], …] of a camera's zones (``cameras[].zones``); empty for an unknown camera."""
    cam = next((c for c in cfg.cameras if c.id == camera), None)
    return {name: [list(p) for p in points] for name, points in (cam.zones if cam else {}).items()}


class EvidenceStore:
    """Snapshot, clip and facts per alert under ``cfg.alerts.evidence_dir``; retention by age and size."""

    def __init__(self, cfg: Config, r: redis.Redis):
        self.cfg, self.r = cfg, r
        self.keys = Keys.for_config(cfg)
        self.root = Path(cfg.alerts.evidence_dir)
        self.config_hash = config_sha256(cfg)
        self._clips: dict[str, tuple[Clip, dict]] = {}
        self._classifier = None  # loaded on the first classify alert
        self._classifier_error: str | None = None
        self._recover()

    # --- paths -------------------------------------------------------------------------
    def path(self, alert_id: str) -> Path:
        """The evidence directory of an alert (it may not exist); EvidenceError for an id that is not a uuid."""
        return self.root / check_id(alert_id)

    def recording(self) -> list[str]:
        """Alert ids whose clip is still waiting for frames after the alert."""
        return sorted(self._clips)

    # --- capture -------------------------------------------------------------------------
    def capture(self, alert: Alert, result: Result | None) -> str:
        """Write the alert's evidence (the clip may finish later, in ``finish``); returns the directory name.

        Never raises for missing frames, Redis or disk trouble: what could not be written is listed in
        evidence.json (``missing``, ``notes``). Raises EvidenceError for an alert id that is not a uuid.
        """
        d = self.path(alert.id)
        facts = self._facts(alert, result)
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.error("evidence for alert %s: cannot create %s: %s", alert.id, d, e)
            return alert.id
        try:
            self._drop_clip(alert.id)  # the same alert captured again (a retried step): start over
            for stale in (SNAPSHOT, CLIP):
                (d / stale).unlink(missing_ok=True)
            frame_id, image = self._snapshot_frame(alert, result, facts)
            if image is not None:
                shown = result
                if result is not None and result.frame_id != frame_id:
                    facts["notes"].append(f"the result is of frame {result.frame_id}, the snapshot shows "
                                          f"frame {frame_id} without it")
                    shown = None
                self._write_snapshot(d, alert, shown, frame_id, image, facts)
            if result is not None:
                self._start_clip(alert, image, facts)
            else:
                facts["clip"] = {"state": "none", "reason": "pipeline-health alerts carry no clip"}
        except Exception as e:  # a bug here must not hold the alert back; the log has the trace
            log.exception("evidence for alert %s is incomplete", alert.id)
            facts["missing"].append(f"evidence capture failed: {type(e).__name__}: {e}")
        self._write_facts(d, facts)
        return alert.id

    def _facts(self, alert: Alert, result: Result | None) -> dict:
        rule = next((r for r in self.cfg.alerts.rules if r.name == alert.rule), None)
        model = result.model if result is not None else str(alert.labels.get("model", ""))
        name, _, version = model.partition("@")
        return {
            "id": alert.id, "alert": {k: v for k, v in alert.to_dict().items() if k != "v"},
            "rule": rule.model_dump(mode="json") if rule is not None else {"name": alert.rule, "builtin": True},
            "threshold": alert.threshold, "value": alert.value,
            "model": {"id": model, "name": name, "version": version} if model else None,
            "config_sha256": self.config_hash, "captured_at": time.time(),
            "frame_ids": {"alert": alert.frame_id or None, "result": result.frame_id if result else None,
                          "snapshot": None, "clip": []},
            "zone": alert.labels.get("zone"), "files": [], "missing": [], "notes": [],
        }

    def _snapshot_frame(self, alert: Alert, result: Result | None, facts: dict) -> tuple[str | None, np.ndarray | None]:
        """(entry id, pixels) of the frame to show: the alert's frame, or for health alerts the camera's latest."""
        try:
            if alert.frame_id:
                entries = self.r.xrange(self.keys.frames, alert.frame_id, alert.frame_id, count=1)
                if not entries:
                    facts["missing"].append(f"frame {alert.frame_id} is no longer in {self.keys.frames}")
                    return None, None
                entry_id, fields = entries[0]
            elif result is None:
                found = self._latest_frame(alert.camera)
                if found is None:
                    facts["missing"].append(f"no frame of camera {alert.camera} in {self.keys.frames}")
                    return None, None
                entry_id, fields = found
                facts["notes"].append(f"snapshot: the latest frame of camera {alert.camera} ({_s(entry_id)})")
            else:
                facts["missing"].append("the alert names no frame")
                return None, None
            return _s(entry_id), self._decode(fields)
        except REDIS_DOWN as e:
            facts["missing"].append(f"frame: Redis unavailable ({type(e).__name__})")
        except redis.ResponseError as e:  # e.g. a frame id that is not a stream entry id
            facts["missing"].append(f"frame {alert.frame_id!r}: {e}")
        except DecodeError as e:
            facts["missing"].append(f"frame: cannot decode it ({e})")
        return None, None

    def _latest_frame(self, camera: str):
        if camera not in {c.id for c in self.cfg.cameras}:  # "pipeline" alerts (lag, dead letters) have none
            return None
        cam, upper, seen = camera.encode(), "+", 0
        while seen < LATEST_SCAN:
            page = self.r.xrevrange(self.keys.frames, upper, "-", count=PAGE)
            for entry_id, fields in page:
                if fields.get(b"cam") == cam:
                    return entry_id, fields
            if len(page) < PAGE:
                return None
            seen += len(page)
            upper = f"({_s(page[-1][0])}"
        return None

    def _decode(self, fields: dict) -> np.ndarray:
        frame = Frame.from_msgpack(fields.get(b"m") or b"", self.cfg.streams.max_message_bytes)
        return decode_frame(frame)

    def _write_snapshot(self, d: Path, alert: Alert, result: Result | None, frame_id: str, image: np.ndarray,
                        facts: dict) -> None:
        zone = alert.labels.get("zone")
        zones = {}
        if zone:
            zones = {k: v for k, v in zones_of(self.cfg, alert.camera).items() if k == zone}
            if not zones:
                facts["missing"].append(f"zone {zone!r} of camera {alert.camera} is not in the config")
        results = {result.task: result.out} if result is not None else {}
        heat = self._heatmap(image, result, facts) if result is not None and result.task == "classify" else None
        try:
            picture = draw(image, results, zones, zone, heat)
        except ValueError as e:
            facts["missing"].append(f"overlay: {e}")
            picture = draw(image, {}, zones, zone)
        try:
            write_atomic(d / SNAPSHOT, encode_jpeg(picture, JPEG_QUALITY))
        except (OSError, ValueError) as e:
            facts["missing"].append(f"{SNAPSHOT}: {e}")
            return
        facts["frame_ids"]["snapshot"] = frame_id
        facts["snapshot"] = {"file": SNAPSHOT, "size": [int(image.shape[1]), int(image.shape[0])]}
        if image.dtype == np.uint16:
            facts["snapshot"]["kelvin_range"] = [int(image.min()) / 100.0, int(image.max()) / 100.0]

    # --- Grad-CAM ------------------------------------------------------------------------
    def _load_classifier(self):
        """The classify model for Grad-CAM, loaded once; None (with the reason kept) when it cannot be."""
        if self._classifier is None and self._classifier_error is None:
            mc = self.cfg.model("classify")
            try:
                # torch is loaded only when a classify alert asks for Grad-CAM: the alert service starts without it
                from shared.models import Predictor  # noqa: PLC0415

                p = Predictor.from_spec("classify", path=str(mc.path) if mc.path else None,
                                        arch=None if mc.path else mc.arch, device="cpu")
                if p.runtime != "torch":
                    raise ValueError(f"{p.name} runs through {p.runtime}; Grad-CAM needs the PyTorch model")
                self._classifier = p
            except Exception as e:  # a missing or broken model must not stop the alert
                self._classifier_error = f"{type(e).__name__}: {e}"
                log.warning("evidence: no Grad-CAM, the classify model cannot be loaded (%s)", self._classifier_error)
        return self._classifier

    def _heatmap(self, image: np.ndarray, result: Result, facts: dict) -> np.ndarray | None:
        predictor = self._load_classifier()
        if predictor is None:
            facts["notes"].append(f"no Grad-CAM: the classify model cannot be loaded ({self._classifier_error})")
            return None
        try:
            import torch  # noqa: PLC0415 (see _load_classifier)

            from shared.models.gradcam import gradcam  # noqa: PLC0415

            img = image if image.ndim == 3 else image[:, :, None]
            if img.shape[2] == 1 and predictor.meta.channels == 3:
                img = np.repeat(img, 3, axis=2)
            prepared, _ = stretch(img, tuple(predictor.meta.input_size))  # as preprocess does for classify
            batch = torch.from_numpy(np.ascontiguousarray(prepared))[None].to(predictor.device)
            index = int(result.out["index"])
            cam = gradcam(predictor.model, predictor._normalise(batch), class_index=index)[0]
        except Exception as e:  # e.g. a class index the loaded model does not have
            facts["notes"].append(f"no Grad-CAM: {type(e).__name__}: {e}")
            return None
        facts["gradcam"] = {"model": predictor.name, "class_index": index, "label": result.out.get("label")}
        if predictor.name != result.model:
            facts["notes"].append(f"Grad-CAM from {predictor.name}, the result came from {result.model}")
        return cam

    # --- clip ----------------------------------------------------------------------------
    def _start_clip(self, alert: Alert, image: np.ndarray | None, facts: dict) -> None:
        a = self.cfg.alerts
        try:
            centre = parse_id(alert.frame_id)[0]
        except (ValueError, AttributeError):
            facts["clip"] = {"state": "none", "reason": f"frame id {alert.frame_id!r} is not a stream entry id"}
            facts["missing"].append(CLIP)
            return
        cam_cfg = next((c for c in self.cfg.cameras if c.id == alert.camera), None)
        zone = alert.labels.get("zone")
        clip = Clip(directory=self.root / alert.id, camera=alert.camera,
                    start_ms=max(0, centre - round(a.clip_before_s * 1000)),
                    end_ms=centre + round(a.clip_after_s * 1000), fps=float(cam_cfg.fps) if cam_cfg else 10.0,
                    zones={k: v for k, v in zones_of(self.cfg, alert.camera).items() if k == zone}, zone=zone)
        if image is not None and image.dtype == np.uint16:
            clip.kelvin = [int(image.min()) / 100.0, int(image.max()) / 100.0]
        facts["clip"] = clip.facts("recording")
        self._clips[alert.id] = (clip, facts)
        try:
            self._advance(alert.id)
        except REDIS_DOWN as e:  # finish() reads the window once Redis is back
            facts["notes"].append(f"clip: Redis unavailable at capture ({type(e).__name__})")

    def finish(self) -> list[str]:
        """Append the frames that arrived to the clips still recording; close those whose window has passed.

        Returns the alert ids whose clip was completed (their evidence.json now lists the clip).
        """
        done = []
        for alert_id in list(self._clips):
            try:
                if self._advance(alert_id):
                    done.append(alert_id)
            except REDIS_DOWN as e:
                log.warning("evidence clip of alert %s: Redis unavailable (%s); trying again", alert_id, e)
                break
        return done

    def _advance(self, alert_id: str) -> bool:
        clip, facts = self._clips[alert_id]
        if not clip.advance(self.r, self.keys.frames, self._decode):
            return False
        del self._clips[alert_id]
        state = "done" if clip.ids else "none"
        try:
            clip.finish()
        except OSError as e:
            state = "none"
            facts["missing"].append(f"{CLIP}: {e}")
        if not clip.ids:
            facts["missing"].append(f"{CLIP}: no frame of camera {clip.camera} left in {self.keys.frames} "
                                    f"between {clip.start_ms} and {clip.end_ms} ms")
        facts["clip"] = clip.facts(state)
        facts["frame_ids"]["clip"] = list(clip.ids)
        self._write_facts(clip.directory, facts)
        return True

    def _drop_clip(self, alert_id: str) -> None:
        held = self._clips.pop(alert_id, None)
        if held is not None:
            held[0].discard()
        (self.root / alert_id / CLIP_TMP).unlink(missing_ok=True)

    def _recover(self) -> None:
        """Clips a stopped alert service left recording are recorded again from their window's start."""
        for tmp in sorted(self.root.glob(f"*/{CLIP_TMP}")) if self.root.is_dir() else []:
            try:
                alert_id = check_id(tmp.parent.name)
                facts = json.loads((tmp.parent / FACTS).read_text())
                clip = Clip.resume(tmp.parent, facts, zones_of(self.cfg, str(facts["clip"]["camera"])))
            except (EvidenceError, OSError, ValueError, KeyError, TypeError) as e:
                log.warning("evidence: cannot resume the clip in %s (%s)", tmp.parent, e)
                continue
            tmp.unlink(missing_ok=True)
            facts["notes"].append("clip recorded again after a restart of the alert service")
            self._clips[alert_id] = (clip, facts)

    # --- files -----------------------------------------------------------------------------
    def _write_facts(self, d: Path, facts: dict) -> None:
        facts["files"] = sorted(name for name in (SNAPSHOT, CLIP) if (d / name).is_file()) + [FACTS]
        try:
            write_atomic(d / FACTS, json.dumps(facts, indent=2, sort_keys=True, default=str).encode())
        except OSError as e:
            log.error("evidence for alert %s: cannot write %s: %s", d.name, FACTS, e)

    def prune(self, now: float | None = None) -> list[str]:
        """Delete evidence older than ``evidence_max_age_days``, then the oldest beyond ``evidence_max_mb`` MiB.

        Age is the directory's modification time. Directories whose clip is still recording are counted
        but kept. Returns the alert ids deleted, oldest first.
        """
        a = self.cfg.alerts
        now = time.time() if now is None else now
        if not self.root.is_dir():
            return []
        dirs = []
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            try:
                check_id(entry.name)
                size = sum(f.stat(follow_symlinks=False).st_size for f in os.scandir(entry.path)
                           if f.is_file(follow_symlinks=False))
                dirs.append((entry.stat(follow_symlinks=False).st_mtime, entry.name, size))
            except (EvidenceError, OSError):
                continue  # not ours, or gone meanwhile
        dirs.sort()
        total = sum(size for _, _, size in dirs)
        removed = []
        for mtime, name, size in dirs:
            if name in self._clips:
                continue
            if mtime >= now - a.evidence_max_age_days * 86400 and total <= a.evidence_max_mb * MIB:
                continue
            try:
                shutil.rmtree(self.root / name)
            except OSError as e:
                log.warning("evidence: cannot delete %s: %s", self.root / name, e)
                continue
            total -= size
            removed.append(name)
        if removed:
            log.info("evidence: deleted %d alert(s) by age or size", len(removed))
        return removed

    def close(self) -> None:
        """Release open clip writers; their clips are recorded again by the next store (see ``_recover``)."""
        for clip, _ in self._clips.values():
            clip.close()  # the temporary file stays: the next store records the clip again
        self._clips.clear()


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)
