"""Prometheus metrics of DESIGN §5: one module, base units, ``_total`` counters, app prefix.

Known label values are pre-created by the services (``precreate``) so dashboards show stable series.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

FRAMES = Counter("plantsight_frames", "Frames handled by a stage (ingest: captured; later stages: processed)",
                 ["camera", "stage"])
DROPPED = Counter("plantsight_frames_dropped", "Frames not processed, by stage and reason", ["camera", "stage", "reason"])
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
MODEL_INFO = Gauge("plantsight_model_info", "The model a task runs (value 1)", ["task", "model", "version", "device"])
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
