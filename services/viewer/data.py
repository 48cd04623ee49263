"""What the viewer shows, read from Redis: cameras, their latest frame and results, alerts, streams, services.

Every function here is a plain read (the viewer writes nothing but acknowledgements), so the page can
never disturb the pipeline. Where the data lives:

- camera status (up, fps, errors): the hash ``{P}:cameras`` that ingest refreshes twice a second;
- the latest frames and results: the newest entries of ``{P}:frames`` and ``{P}:results`` (each entry
  carries its camera in the ``cam`` field, so filtering needs no decoding);
- alerts: ``{P}:alerts`` (a firing alert's id is its episode; the resolve carries ``labels.episode``),
  acknowledgements in ``{P}:alert-acks``, evidence files under ``alerts.evidence_dir/<id>/``;
- streams: `shared.streams.stats.stream_stats`; processes: the heartbeats in ``{P}:services``;
- shadow models: each infer worker's record in ``{P}:models:shadow-state`` (refreshed every
  ``inference.model_poll_s``), summed per task.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import numpy as np
import redis

from shared.acks import acknowledgements
from shared.config import Config
from shared.imaging import decode_frame
from shared.keys import Keys
from shared.messages import Alert, DecodeError, Frame, Result
from shared.rules import fields_of
from shared.service import service_heartbeats
from shared.streams.stats import stream_stats

SCAN_FRAMES = 400  # newest frame entries looked at for the latest frame of each camera
SCAN_RESULTS = 1000  # newest result entries looked at for the latest results of each camera
SCAN_ALERTS = 5000
# The one number per task that the camera page plots over time.
KEY_VALUE = {"classify": "prob", "detect": "count", "segment": "defect_ratio", "thermal": "max_k"}
EVIDENCE_FILES = ("snapshot.jpg", "clip.mp4", "evidence.json")
SHADOW_STALE_S = 30.0  # a worker's shadow record older than this is of a worker that stopped: not shown


def _field(fields: dict, name: bytes) -> str:
    v = fields.get(name, b"")
    return v.decode() if isinstance(v, bytes) else str(v)


def valid_alert_id(alert_id: str) -> bool:
    """Alert ids are UUIDs; anything else never reaches a file path or a Redis lookup."""
    try:
        return str(uuid.UUID(alert_id)) == alert_id
    except ValueError:
        return False


class ViewerData:
    def __init__(self, cfg: Config, r: redis.Redis):
        self.cfg, self.r = cfg, r
        self.keys = Keys.for_config(cfg)
        self.cameras_cfg = {c.id: c for c in cfg.cameras}

    # --- cameras -------------------------------------------------------------------------
    def camera_status(self) -> dict[str, dict]:
        raw = self.r.hgetall(self.keys.cameras)
        out = {}
        for k, v in raw.items():
            try:
                out[k.decode()] = json.loads(v)
            except ValueError:
                continue
        return out

    def _newest(self, stream: str, limit: int, page: int = 64, low: str = "-"):
        """(entry id, fields) from the newest backwards, fetched a page at a time so a caller that has
        found what it wants early reads only a little of a long stream."""
        high, seen = "+", 0
        while seen < limit:
            batch = self.r.xrevrange(stream, max=high, min=low, count=min(page, limit - seen))
            if not batch:
                return
            for entry in batch:
                yield entry
            seen += len(batch)
            high = "(" + batch[-1][0].decode()

    def latest_results(self, camera: str | None = None, since_s: float | None = None) -> dict[str, dict[str, dict]]:
        """camera → task → the newest result (as a dict: frame_id, seq, ts, model, out)."""
        wanted = {c.id: set(c.tasks) for c in self.cfg.cameras if camera is None or c.id == camera}
        latest: dict[str, dict[str, dict]] = {}
        low = f"{int((time.time() - since_s) * 1000)}-0" if since_s else "-"
        for _, fields in self._newest(self.keys.results, SCAN_RESULTS, low=low):
            cam, task = _field(fields, b"cam"), _field(fields, b"task")
            if task not in wanted.get(cam, ()) or task in latest.get(cam, {}):
                continue
            try:
                res = Result.from_msgpack(fields.get(b"m", b""), self.cfg.streams.max_message_bytes)
            except DecodeError:
                continue
            latest.setdefault(res.camera, {})[res.task] = {
                "frame_id": res.frame_id, "seq": res.seq, "ts": res.ts, "model": res.model, "out": res.out}
            if all(len(latest.get(c, {})) == len(t) for c, t in wanted.items()):
                break
        return latest

    def cameras(self) -> list[dict]:
        """One row per configured camera: status, tasks and the key value of each task's latest result."""
        status, latest = self.camera_status(), self.latest_results()
        now = time.time()
        rows = []
        for cam in self.cfg.cameras:
            st = status.get(cam.id, {})
            res = latest.get(cam.id, {})
            last = float(st.get("last_frame") or 0.0)
            rows.append({
                "id": cam.id, "tasks": list(cam.tasks), "fps": st.get("fps", 0.0),
                "up": bool(st.get("up")) and now - last < max(5.0, 3.0 / max(cam.fps, 0.1)),
                "last_frame_age_s": round(now - last, 1) if last else None,
                "error": st.get("error", ""), "frozen": bool(st.get("frozen_since")),
                "black": bool(st.get("black_since")),
                "zones": self.zones(cam.id),
                "latest": {task: summary(task, r["out"]) | {"seq": r["seq"], "ts": r["ts"], "model": r["model"]}
                           for task, r in res.items()},
            })
        return rows

    def camera(self, camera: str) -> dict | None:
        if camera not in self.cameras_cfg:
            return None
        row = next(c for c in self.cameras() if c["id"] == camera)
        row["results"] = self.latest_results(camera).get(camera, {})
        row["history"] = self.history(camera)
        return row

    def zones(self, camera: str) -> dict:
        cam = self.cameras_cfg.get(camera)
        return dict(getattr(cam, "zones", None) or {})

    def history(self, camera: str, seconds: float = 300.0, points: int = 300) -> dict[str, list[list[float]]]:
        """task → [[unix seconds, key value], …] oldest first, over the last `seconds` in the results stream."""
        since_ms = int((time.time() - seconds) * 1000)
        out: dict[str, list[list[float]]] = {}
        for _, fields in self.r.xrevrange(self.keys.results, min=f"{since_ms}-0", count=SCAN_RESULTS * 4):
            if _field(fields, b"cam") != camera:
                continue
            try:
                res = Result.from_msgpack(fields.get(b"m", b""), self.cfg.streams.max_message_bytes)
            except DecodeError:
                continue
            value = fields_of(res.task, res.out).get(KEY_VALUE.get(res.task, ""))
            if isinstance(value, (int, float)):
                out.setdefault(res.task, []).append([round(res.ts / 1e9, 3), float(value)])
        step = {task: max(1, len(v) // points) for task, v in out.items()}
        return {task: v[::-1][::step[task]] for task, v in out.items()}

    def frame(self, camera: str, frame_id: str | None = None) -> tuple[Frame, str] | None:
        """A camera's frame by id, else its newest one still in ``{P}:frames``."""
        if frame_id:
            got = self.r.xrange(self.keys.frames, frame_id, frame_id, count=1)
            entries = [(i, f) for i, f in got if _field(f, b"cam") == camera]
        else:
            entries = next(([(i, f)] for i, f in self._newest(self.keys.frames, SCAN_FRAMES, page=16)
                            if _field(f, b"cam") == camera), [])
        for entry_id, fields in entries:
            try:
                return Frame.from_msgpack(fields.get(b"m", b""), self.cfg.streams.max_message_bytes), entry_id.decode()
            except DecodeError:
                continue
        return None

    def picture(self, camera: str) -> tuple[np.ndarray, dict[str, dict], str] | None:
        """(pixels, task → result out, frame id): the newest frame that has results, drawn with those.

        Results lag the frame stream by the pipeline's latency, so the frame shown is the one the newest
        result belongs to; results of other tasks are taken when they are of the same frame, else their newest.
        """
        # Only recent results can belong to a frame still worth showing; without the bound a camera with no
        # results (down, or its task's infer down) costs a scan of SCAN_RESULTS entries 4 times a second.
        fps = self.cameras_cfg[camera].fps if camera in self.cameras_cfg else 1.0
        results = self.latest_results(camera, since_s=max(30.0, 3.0 / fps)).get(camera, {})
        if results:
            newest = max(results.values(), key=lambda r: r["seq"])
            got = self.frame(camera, newest["frame_id"])
            if got is not None:
                frame, frame_id = got
                return decode_frame(frame), {t: r["out"] for t, r in results.items()}, frame_id
        got = self.frame(camera)
        if got is None:
            return None
        frame, frame_id = got
        return decode_frame(frame), {}, frame_id

    # --- alerts ----------------------------------------------------------------------------
    def alerts(self, camera: str | None = None, rule: str | None = None, severity: str | None = None,
               state: str | None = None, limit: int = 200, *, evidence: bool = True) -> list[dict]:
        """Episodes, newest first: the firing alert with its resolve (if any), acknowledgement and evidence."""
        episodes: dict[str, dict] = {}
        resolves: dict[str, Alert] = {}
        for entry_id, fields in self.r.xrevrange(self.keys.alerts, count=SCAN_ALERTS):
            try:
                a = Alert.from_msgpack(fields.get(b"m", b""), self.cfg.streams.max_message_bytes)
            except DecodeError:
                continue
            if a.state == "resolved":
                resolves.setdefault(a.labels.get("episode", a.id), a)
            elif a.labels.get("episode", a.id) != a.id:
                continue  # a repeat notification (repeat_s): its episode is listed by the firing alert
            elif a.id not in episodes:
                episodes[a.id] = self._episode(a, entry_id.decode())
        acks = acknowledgements(self.r, self.keys.prefix)
        rows = []
        for ep in episodes.values():
            res = resolves.get(ep["id"])
            ep["state"] = "resolved" if res else "firing"
            ep["resolved_ts"] = res.ts if res else None
            ep["ack"] = acks.get(ep["id"])
            if ((camera and ep["camera"] != camera) or (rule and ep["rule"] != rule)
                    or (severity and ep["severity"] != severity) or (state and ep["state"] != state)):
                continue
            rows.append(ep)
        rows.sort(key=lambda e: e["ts"], reverse=True)
        rows = rows[:limit]
        for ep in rows if evidence else ():  # file lookups only for the rows returned, not every episode scanned
            ep["evidence"] = self.evidence_files(ep["id"])
        return rows

    def _episode(self, a: Alert, entry_id: str) -> dict:
        return {"id": a.id, "entry": entry_id, "rule": a.rule, "severity": a.severity, "camera": a.camera,
                "task": a.task, "ts": a.ts, "value": a.value, "threshold": a.threshold, "message": a.message,
                "frame_id": a.frame_id, "labels": a.labels}

    def alert(self, alert_id: str) -> dict | None:
        if not valid_alert_id(alert_id):
            return None
        for ep in self.alerts(limit=SCAN_ALERTS, evidence=False):
            if ep["id"] == alert_id:
                ep["evidence"] = self.evidence_files(alert_id)
                facts = self.evidence_path(alert_id, "evidence.json")
                if facts is not None:
                    try:
                        ep["evidence_json"] = json.loads(facts.read_text())
                    except (OSError, ValueError):
                        ep["evidence_json"] = None
                return ep
        return None

    def evidence_path(self, alert_id: str, name: str) -> Path | None:
        if name not in EVIDENCE_FILES or not valid_alert_id(alert_id):
            return None
        path = Path(self.cfg.alerts.evidence_dir) / alert_id / name
        return path if path.is_file() else None

    def evidence_files(self, alert_id: str) -> list[str]:
        return [n for n in EVIDENCE_FILES if self.evidence_path(alert_id, n) is not None]

    # --- pipeline health -------------------------------------------------------------------
    def streams(self) -> list[dict]:
        rows = stream_stats(self.r, self.keys, self.cfg.tasks())
        dead = {}
        for _, fields in self.r.xrevrange(self.keys.deadletter, count=1000):
            reason = _field(fields, b"reason") or "?"
            dead[reason] = dead.get(reason, 0) + 1
        for row in rows:
            if row["stream"] == self.keys.deadletter:
                row["reasons"] = dead
        return rows

    def services(self) -> list[dict]:
        return service_heartbeats(self.r, self.keys.prefix)

    def shadows(self) -> list[dict]:
        """Per task with a shadow model: the live and shadow models, its share, state, the frames compared and
        the mean agreement over them (a frame-weighted mean over the infer workers that report one)."""
        now, tasks = time.time(), {}
        for raw in self.r.hgetall(self.keys.models_shadow_state).values():
            try:
                rec = json.loads(raw)
                if now - float(rec["at"]) > SHADOW_STALE_S:
                    continue
                task = str(rec["task"])
            except (ValueError, KeyError, TypeError):
                continue
            row = tasks.setdefault(task, {"task": task, "live": rec.get("live"), "shadow": rec.get("shadow"),
                                          "path": rec.get("path"), "share": rec.get("share"),
                                          "measure": rec.get("measure"), "state": rec.get("state"),
                                          "error": rec.get("error"), "workers": 0, "frames": 0, "total": 0.0})
            row["workers"] += 1
            frames = int(rec.get("frames") or 0)
            if frames and isinstance(rec.get("mean"), (int, float)):
                row["frames"] += frames
                row["total"] += frames * float(rec["mean"])
            if rec.get("state") != "running":  # a worker that refused or dropped it says so for the task
                row["state"], row["error"] = rec.get("state"), rec.get("error")
        rows = []
        for task in sorted(tasks):
            row = tasks[task]
            total = row.pop("total")
            row["mean"] = round(total / row["frames"], 4) if row["frames"] else None
            rows.append(row)
        return rows


def summary(task: str, out: dict) -> dict:
    """The few facts of one result the grid shows under a camera."""
    f = fields_of(task, out)
    if task == "classify":
        return {"label": f.get("label"), "prob": round(float(f.get("prob") or 0.0), 3)}
    if task == "detect":
        return {"count": f.get("count", 0), "max_score": round(float(f.get("max_score") or 0.0), 3)}
    if task == "segment":
        return {"defect_ratio": round(float(f.get("defect_ratio") or 0.0), 4), "regions": f.get("regions", 0)}
    if task == "thermal":
        return {k: (round(float(f[k]), 1) if isinstance(f.get(k), (int, float)) else None)
                for k in ("max_k", "avg_k", "min_k")} | {"hotspots": f.get("hotspots", 0)}
    return {}
