"""Model swap without downtime: a new model version is loaded and warmed beside the running one, and
switched in between two batches.

A watcher thread looks every ``inference.model_poll_s`` at where each task's model comes from: the
hash ``{P}:models:deploy`` (field = task, value = JSON ``{"path": DIR}``, written by
``plantsight models deploy TASK DIR``) or else the model directory in the config. When the directory's
``model.json`` or weights change (size, mtime, version), it builds the new Predictor with the same
engine options and warms it; the service's thread switches to it before its next batch, so every
batch runs wholly on one model and nothing is dropped or run twice. A model that fails to load or warm,
or takes another input size than the running one (preprocess sizes frames for it), is refused: the old
model keeps running and the refusal is logged and kept in ``{P}:models:active`` with the reason.
``plantsight_model_info`` drops the old model's series and shows the new one.

A task's shadow model (``shadow.py``) is learnt the same way, from ``{P}:models:shadow`` (written by
``plantsight models shadow``; a null path: no shadow) or else ``models.<task>.shadow``: loaded and warmed
here, installed between two batches, and dropped when its source says none. Every look also records, per
task and worker, the shadow that runs and its agreement so far in ``{P}:models:shadow-state``.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from services.inference.loading import load_predictor
from services.inference.shadow import Shadow, reason
from shared import metrics
from shared.agreement import MEASURES
from shared.models.modeldir import FILES, META

log = logging.getLogger("plantsight.swap")


def fingerprint(path: str | os.PathLike) -> tuple:
    """What changes when a model directory gets a new model: its files' sizes and mtimes."""
    d = Path(path)
    out = [str(d.resolve())]
    for name in (META, *FILES.values()):
        try:
            st = (d / name).stat()
            out.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((name, None))
    return tuple(out)


class ModelSwapper:
    """Watches each task's model source; loads, warms and hands over new versions to ``service``."""

    def __init__(self, service):
        self.svc = service
        self.poll_s = service.cfg.inference.model_poll_s
        self.current: dict[str, tuple | None] = {}
        self.refused: dict[str, tuple] = {}
        self.ready: dict[str, tuple] = {}  # task -> (predictor, fingerprint, path), waiting for a batch boundary
        # Shadows: the fingerprint of the one loaded (None: none), of the last refused, and, waiting for a
        # batch boundary, the one to install (None: drop the running one).
        self.shadow_fp: dict[str, tuple | None] = {}
        self.shadow_refused: dict[str, tuple] = {}
        self.shadow_ready: dict[str, Shadow | None] = {}
        self.shadow_problem: dict[str, dict] = {}  # task -> the record of a refused or failed shadow
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        for run in service.runners:
            spec = service.cfg.model(run.task)
            self.current[run.task] = fingerprint(spec.path) if spec.path else None

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="model-swap", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        first = True  # the first look is at once: a configured shadow starts with the service
        while (first or not self._stop.wait(self.poll_s)) and not self.svc.stop.is_set():
            first = False
            try:
                self.check()
            except Exception as e:  # Redis away, a file vanishing mid-read: look again next time
                log.warning("model check failed (%s: %s); trying again in %.0f s", type(e).__name__, e, self.poll_s)

    def source(self, task: str) -> str | None:
        """The model directory a task should run: a deployed one, else the config's (None: an architecture)."""
        raw = self.svc.r.hget(self.svc.keys.models_deploy, task)
        if raw:
            try:
                return str(json.loads(raw)["path"])
            except (ValueError, KeyError, TypeError):
                log.error("%s: deploy entry for %s is not JSON with a path: %r", self.svc.keys.models_deploy,
                          task, raw[:200])
                return None
        spec = self.svc.cfg.model(task)
        return str(spec.path) if spec.path else None

    def check(self) -> None:
        """Look once at every task's source; load and warm what changed (on this, the watcher's, thread)."""
        for run in self.svc.runners:
            path = self.source(run.task)
            if path is None:
                continue
            fp = fingerprint(path)
            if fp == self.current.get(run.task) or fp == self.refused.get(run.task):
                continue
            with self._lock:
                if run.task in self.ready and self.ready[run.task][1] == fp:
                    continue
            self.load(run, path, fp)
        for run in self.svc.runners:
            self.check_shadow(run)
        self.publish_shadows()

    # --- shadows ------------------------------------------------------------------------------------
    def shadow_source(self, task: str) -> tuple[str | None, float]:
        """(the shadow model directory a task should run, or None; its share of the task's frames)."""
        spec = self.svc.cfg.model(task)
        raw = self.svc.r.hget(self.svc.keys.models_shadow, task)
        if raw:
            try:
                asked = json.loads(raw)
                path = asked["path"]
                share = float(asked.get("share") or spec.shadow_share)
                if not 0 < share <= 1:
                    raise ValueError(f"share {share} is not in (0, 1]")
                return (None if path is None else str(path)), share
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                log.error("%s: shadow entry for %s is not JSON with a path and a share in (0, 1] (%s): %r",
                          self.svc.keys.models_shadow, task, e, raw[:200])
                return None, spec.shadow_share
        return (str(spec.shadow) if spec.shadow else None), spec.shadow_share

    def check_shadow(self, run) -> None:
        task = run.task
        path, share = self.shadow_source(task)
        if path is None:
            self.shadow_problem.pop(task, None)
            if self.shadow_fp.get(task) is not None:
                self.shadow_fp[task] = None
                with self._lock:
                    self.shadow_ready[task] = None
                log.info("%s: shadow model off", task)
            return
        fp = fingerprint(path)
        if fp == self.shadow_fp.get(task):
            with self._lock:
                loaded = self.shadow_ready.get(task) or run.shadow
            if loaded is not None and loaded.fp == fp:
                loaded.share = share  # the same model: only its share may have changed
            return
        if fp == self.shadow_refused.get(task):
            return
        inf = self.svc.cfg.inference
        try:
            new = load_predictor(task, path=path, arch=None, device=self.svc.device, inf=inf)
            live = run.predictor
            if new.input_size() != live.input_size():
                raise ValueError(f"takes {list(new.input_size())} frames but the live {live.name} takes "
                                 f"{list(live.input_size())}: a shadow runs on the live model's frames")
        except Exception as e:  # a corrupt file, a warm-up failing: the live model runs on alone
            self.drop_shadow(task, fp, path, "load", reason(e))
            return
        log.info("%s: shadow model %s from %s loaded and warmed (engine %s), on %g of the frames",
                 task, new.name, path, new.engine, share)
        self.shadow_fp[task] = fp
        self.shadow_problem.pop(task, None)
        with self._lock:
            self.shadow_ready[task] = Shadow(new, path, fp, share)

    def drop_shadow(self, task: str, fp: tuple, path: str, reason: str, why: str) -> None:
        """Give up a shadow (``reason``: load or inference): log it once, count it, and load it no more until
        its directory changes; any running shadow of the task stops at the next batch."""
        verb = "refused" if reason == "load" else "failed on frames"
        log.error("%s: shadow model in %s %s (%s); dropped, the live model is not affected", task, path, verb, why)
        metrics.SHADOW_FAILURES.labels(task=task, reason=reason).inc()
        self.shadow_refused[task] = fp
        self.shadow_fp[task] = None
        self.shadow_problem[task] = {"state": "refused" if reason == "load" else "failed", "path": path,
                                     "error": why}
        with self._lock:
            self.shadow_ready[task] = None

    def apply_shadows(self) -> None:
        """On the service's thread, between two batches: install or drop the shadows that changed."""
        with self._lock:
            ready, self.shadow_ready = self.shadow_ready, {}
        for run in self.svc.runners:
            if run.task in ready:
                old, run.shadow = run.shadow, ready[run.task]
                if run.shadow is not None:
                    self.svc.log.info("%s: shadow %s runs beside %s", run.task, run.shadow.name, run.predictor.name)
                elif old is not None:
                    self.svc.log.info("%s: shadow %s stopped", run.task, old.name)

    def publish_shadows(self) -> None:
        """Each task's shadow on this worker, and its agreement so far, for the viewer and the command line."""
        key, at = self.svc.keys.models_shadow_state, time.time()
        pipe = self.svc.r.pipeline(transaction=False)
        for run in self.svc.runners:
            field = f"{run.task}|{self.svc.consumer}"
            with self._lock:
                pending = self.shadow_ready.get(run.task, run.shadow)
            rec = pending.record() if pending is not None else self.shadow_problem.get(run.task)
            if rec is None:
                pipe.hdel(key, field)
                continue
            rec = {"task": run.task, "consumer": self.svc.consumer, "measure": MEASURES[run.task], **rec, "at": at}
            rec["live"] = rec.get("live") or run.predictor.name
            pipe.hset(key, field, json.dumps(rec))
        pipe.execute()

    def load(self, run, path: str, fp: tuple) -> None:
        inf = self.svc.cfg.inference
        old = run.predictor
        try:
            new = load_predictor(run.task, path=path, arch=None, device=self.svc.device, inf=inf)
            if new.input_size() != old.input_size():
                raise ValueError(f"takes {list(new.input_size())} frames but {old.name} takes "
                                 f"{list(old.input_size())}; restart preprocess and infer to change the size")
        except Exception as e:  # ModelError, a corrupt file, a warm-up failing: keep the running model
            why = f"{type(e).__name__}: {e}"[:500]
            log.error("%s: new model in %s refused (%s); keeping %s", run.task, path, why, old.name)
            self.refused[run.task] = fp
            self._publish(run.task, old, path, refused=why)
            return
        log.info("%s: %s from %s loaded and warmed (engine %s); switching at the next batch",
                 run.task, new.name, path, new.engine)
        with self._lock:
            self.ready[run.task] = (new, fp, path)

    def apply(self) -> None:
        """On the service's thread, between two batches: switch every task whose new model is ready."""
        if self.shadow_ready:
            self.apply_shadows()
        if not self.ready:
            return
        with self._lock:
            ready, self.ready = self.ready, {}
        for run in self.svc.runners:
            if run.task not in ready:
                continue
            new, fp, path = ready[run.task]
            old, run.predictor = run.predictor, new
            self.current[run.task] = fp
            self.refused.pop(run.task, None)
            dev = self.svc.device
            try:
                metrics.MODEL_INFO.remove(run.task, old.arch, old.version, dev, old.runtime_label)
            except KeyError:  # the series was never set for this model: nothing to drop
                pass
            metrics.MODEL_INFO.labels(task=run.task, model=new.arch, version=new.version, device=dev,
                                      runtime=new.runtime_label).set(1)
            self.svc.log.info("%s: switched from %s to %s", run.task, old.name, new.name)
            try:
                self._publish(run.task, new, path)
            except Exception as e:  # Redis away: the switch stands; the record is only for people
                log.warning("could not record the switch in %s: %s", self.svc.keys.models_active, e)

    def _publish(self, task: str, predictor, path: str, refused: str | None = None) -> None:
        rec = {"model": predictor.name, "engine": predictor.engine, "path": path, "at": time.time(),
               "consumer": self.svc.consumer}
        if refused:
            rec["refused"] = refused
        self.svc.r.hset(self.svc.keys.models_active, task, json.dumps(rec))
