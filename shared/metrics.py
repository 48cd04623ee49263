"""Prometheus metrics (docs/metrics.md): one module, base units, ``_total`` counters, app prefix.

Known label values are pre-created by the services (``precreate``) so dashboards show stable series.
"""

from __future__ import annotations

import os
import threading

import redis
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

FRAMES = Counter("plantsight_frames", "Frames handled by a stage (ingest: captured; later stages: processed)",
                 ["camera", "stage"])
DROPPED = Counter("plantsight_frames_dropped", "Frames not processed, by stage and reason", ["camera", "stage",
                                                                                             "reason"])
STREAM_LENGTH = Gauge("plantsight_stream_length", "Entries in a Redis stream", ["stream"])
CONSUMER_LAG = Gauge("plantsight_consumer_lag", "Entries not yet delivered to a consumer group", ["stream", "group"])
CONSUMER_PENDING = Gauge("plantsight_consumer_pending", "Entries delivered but not acknowledged", ["stream", "group"])
STAGE_SECONDS = Histogram("plantsight_stage_seconds", "Time spent per frame in a stage", ["stage"],
                          buckets=LATENCY_BUCKETS)
END_TO_END = Histogram("plantsight_end_to_end_seconds", "Capture to result time", ["task"], buckets=LATENCY_BUCKETS)
BATCH_SIZE = Histogram("plantsight_batch_size", "Frames per inference batch", ["task"], buckets=BATCH_BUCKETS)
INFERENCE_SECONDS = Histogram("plantsight_inference_seconds", "Model time per batch", ["task", "model"],
                              buckets=LATENCY_BUCKETS)
CAMERA_UP = Gauge("plantsight_camera_up", "1 when the camera delivers frames", ["camera"])
CAMERA_RECONNECTS = Counter("plantsight_camera_reconnects", "Reconnects to a camera", ["camera"])
CAMERA_FPS = Gauge("plantsight_camera_fps", "Frames per second read from a camera (last seconds)", ["camera"])
ALERTS = Counter("plantsight_alerts", "Alerts raised", ["rule", "severity"])
SINK_DELIVERIES = Counter("plantsight_sink_deliveries", "Alert deliveries by sink and outcome", ["sink", "outcome"])
DEADLETTER = Counter("plantsight_deadletter", "Entries sent to the dead-letter stream", ["stage", "reason"])
MODEL_INFO = Gauge("plantsight_model_info", "The model a task runs (value 1) and the runtime that runs it",
                   ["task", "model", "version", "device", "runtime"])
# A shadow model's agreement with the live model, per compared frame (services/inference/shadow.py; the
# measures are shared/agreement.py's). Each histogram's _count is the frames compared; sum/count the mean.
AGREEMENT_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)
KELVIN_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 25.0, 50.0)
SHADOW_AGREEMENT = Histogram("plantsight_shadow_agreement",
                             "Shadow model's agreement with the live model per frame (classify: same label, "
                             "detect: box F1 at IoU 0.5, segment: mask Dice)", ["task", "live", "shadow"],
                             buckets=AGREEMENT_BUCKETS)
SHADOW_MAX_K_DIFF = Histogram("plantsight_shadow_max_k_difference_kelvin",
                              "Thermal shadow model: absolute difference of a frame's max temperature from the "
                              "live model's", ["task", "live", "shadow"], buckets=KELVIN_BUCKETS)
SHADOW_FAILURES = Counter("plantsight_shadow_failures", "Shadow models dropped: failed to load, or raised on frames",
                          ["task", "reason"])
REDIS_UP = Gauge("plantsight_redis_up", "1 while this service reaches Redis", ["service"])


def precreate_camera(camera: str, stages: tuple[str, ...]) -> None:
    """Create a camera's series at zero so rates and sums work from the first scrape."""
    for stage in stages:
        FRAMES.labels(camera=camera, stage=stage)
        DROPPED.labels(camera=camera, stage=stage, reason="deadletter")


def precreate_stage(stage: str, reasons: tuple[str, ...] = ("decode_error", "max_deliveries", "oversized")) -> None:
    STAGE_SECONDS.labels(stage=stage)
    for reason in reasons:
        DEADLETTER.labels(stage=stage, reason=reason)


def native_thread_cpu_s() -> float:
    """CPU seconds of this process's threads that Python did not start (torch's intra-op and inter-op
    workers in infer), from /proc; 0 where there is no /proc.

    A Python thread that has just ended (gone from ``threading.enumerate()``, not yet from /proc) counts
    for that moment; in infer those are the HTTP server's request threads, a few ms of CPU each at most."""
    python = {t.native_id for t in threading.enumerate()}
    ticks = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 0.0
    for tid in tids:
        if int(tid) in python:
            continue
        try:
            with open(f"/proc/self/task/{tid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


class ModelCpu:
    """``plantsight_model_cpu_seconds_total`` (infer only): the CPU the networks used, so that the rest of
    a process's CPU is what the pipeline costs around them. It is the CPU of the thread that runs a batch,
    counted inside ``predict`` only, plus that of every thread Python did not start (torch's workers),
    read when Prometheus scrapes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._in_predict = 0.0
        self._last = 0.0
        self._registered = False

    NAME, HELP = "plantsight_model_cpu_seconds", "CPU time the networks used (infer)"

    def register(self) -> None:
        if not self._registered:  # once per process (tests build several services)
            REGISTRY.register(self)
            self._registered = True

    def add(self, seconds: float) -> None:
        with self._lock:
            self._in_predict += seconds

    def seconds(self) -> float:
        with self._lock:  # never backwards, even if a worker thread ended and took its time with it
            self._last = max(self._last, self._in_predict + native_thread_cpu_s())
            return self._last

    def describe(self):  # the name, for the registry's check of duplicates, without reading /proc
        yield CounterMetricFamily(self.NAME, self.HELP, value=0)

    def collect(self):
        yield CounterMetricFamily(self.NAME, self.HELP, value=self.seconds())


MODEL_CPU = ModelCpu()


class AlertVerdicts:
    """``plantsight_alert_verdicts_total{rule,verdict}`` (alert service only): acknowledgements carrying an
    operator's verdict, per rule. The viewer, the CLI and the alert service all write verdicts, so no one
    process can count them as they happen: the acknowledgements hash in Redis is counted when Prometheus
    scrapes (``watch`` names how). The known rules' series exist at zero from the first scrape; while Redis
    is away the family has no samples rather than failing the whole scrape."""

    NAME, HELP = "plantsight_alert_verdicts", "Acknowledged alerts an operator judged, by rule and verdict"

    def __init__(self):
        self._count = None
        self._zeros: dict[tuple[str, str], int] = {}
        self._registered = False

    def watch(self, count, rules, verdicts) -> None:
        """Count with ``count()`` → {(rule, verdict): n} from now on (the last service built in this
        process wins: tests build several), with ``rules`` × ``verdicts`` at zero."""
        self._count = count
        self._zeros = {(rule, verdict): 0 for rule in rules for verdict in verdicts}
        if not self._registered:
            REGISTRY.register(self)
            self._registered = True

    def describe(self):  # the name, for the registry's check of duplicates, without asking Redis
        yield CounterMetricFamily(self.NAME, self.HELP, labels=["rule", "verdict"])

    def collect(self):
        family = CounterMetricFamily(self.NAME, self.HELP, labels=["rule", "verdict"])
        try:
            counts = {**self._zeros, **self._count()} if self._count else {}
        except (redis.RedisError, OSError):  # Redis away: plantsight_redis_up says so; the rest still goes out
            counts = {}
        for (rule, verdict), n in sorted(counts.items()):
            family.add_metric([rule, verdict], n)
        yield family


ALERT_VERDICTS = AlertVerdicts()
