"""Every Redis key plantsight uses, and the consumer groups that read its streams.

All keys start with the configured prefix ``redis.prefix`` (``{P}`` below); several pipelines can share
one Redis under different prefixes. The key strings are part of the deployed interface (dashboards,
operators with redis-cli, data already in Redis): a key is renamed only together with a migration.

================================  ======  ==================================================================
key                               type    what it holds
================================  ======  ==================================================================
``{P}:frames``                    stream  encoded camera frames, written by ingest
``{P}:prepared:<task>``           stream  frames cropped and resized for one task's network, by preprocess
``{P}:results``                   stream  inference results, written by infer
``{P}:shadow``                    stream  results of shadow models (candidates on trial), by infer; never alerted on
``{P}:alerts``                    stream  alerts (firing, repeated, resolved), written by the alert service
``{P}:deadletter``                stream  entries no stage could process, with the stage and the reason
``{P}:cameras``                   hash    camera id → JSON status from ingest (up, fps, last frame, frozen…)
``{P}:seq``                       hash    camera id → the end of the block of frame numbers ingest reserved
``{P}:alert-state``               hash    ``rule|camera|scope`` → JSON episode state of the alert service
``{P}:alert-acks``                hash    alert id → JSON acknowledgement ``{"by", "at", "note", "verdict"…}``
``{P}:sink-state:<sink>``         hash    the episodes a stateful sink (mqtt, alertmanager) has firing
``{P}:models:deploy``             hash    task → JSON ``{"path", "at"}``: the model directory asked for
``{P}:models:active``             hash    task → JSON: the model infer runs, or the refusal and its reason
``{P}:models:shadow``             hash    task → JSON ``{"path", "share", "at"}``: the shadow asked for (null: none)
``{P}:models:shadow-state``       hash    ``task|consumer`` → JSON: the shadow an infer worker runs and its agreement
``{P}:services``                  hash    process id → JSON heartbeat (service, replica, host, pid, port…)
================================  ======  ==================================================================

Every stream entry has the msgpack message in field ``m`` plus readable ``cam`` and ``task`` fields
(docs/wire-format.md). The consumer groups:

- ``{P}:frames``: ``preprocess``; or, with ``inference.read_from: frames``, ``infer-<task>`` for each task
  (infer then prepares the frames itself and the ``prepared`` streams are not used);
- ``{P}:prepared:<task>``: ``infer-<task>``;
- ``{P}:results``: ``alert``;
- ``{P}:alerts``: ``sink-<sink>`` for each alert sink.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from shared.config import Config


class Keys:
    """The keys for one prefix, and the streams and groups of a pipeline with given tasks."""

    PREPROCESS = "preprocess"  # the group of preprocess on {P}:frames
    ALERT = "alert"  # the group of the alert service on {P}:results

    def __init__(self, prefix: str, infer_reads_frames: bool = False):
        self.prefix = prefix
        self.infer_reads_frames = infer_reads_frames
        self.frames = f"{prefix}:frames"
        self.results = f"{prefix}:results"
        self.shadow = f"{prefix}:shadow"
        self.alerts = f"{prefix}:alerts"
        self.deadletter = f"{prefix}:deadletter"
        self.cameras = f"{prefix}:cameras"
        self.seq = f"{prefix}:seq"
        self.alert_state = f"{prefix}:alert-state"
        self.alert_acks = f"{prefix}:alert-acks"
        self.models_deploy = f"{prefix}:models:deploy"
        self.models_active = f"{prefix}:models:active"
        self.models_shadow = f"{prefix}:models:shadow"
        self.models_shadow_state = f"{prefix}:models:shadow-state"
        self.services = f"{prefix}:services"

    @classmethod
    def for_config(cls, cfg: Config) -> Keys:
        return cls(cfg.redis.prefix, infer_reads_frames=cfg.inference.read_from == "frames")

    def prepared(self, task: str) -> str:
        return f"{self.prefix}:prepared:{task}"

    def sink_state(self, sink: str) -> str:
        return f"{self.prefix}:sink-state:{sink}"

    @staticmethod
    def infer_group(task: str) -> str:
        return f"infer-{task}"

    def frame_groups(self, tasks: Iterable[str]) -> list[str]:
        """The consumer groups that read ``{P}:frames``, in a stable order."""
        return [self.infer_group(t) for t in sorted(tasks)] if self.infer_reads_frames else [self.PREPROCESS]

    def frame_readers_write(self, tasks: Iterable[str]) -> list[str]:
        """The streams the readers of ``{P}:frames`` write what they have read into."""
        return [self.results] if self.infer_reads_frames else [self.prepared(t) for t in sorted(tasks)]

    def all(self, tasks: Iterable[str]) -> list[tuple[str, str | None]]:
        """(stream, group) of every stream a pipeline with these tasks uses."""
        tasks = list(tasks)
        out: list[tuple[str, str | None]] = [(self.frames, g) for g in self.frame_groups(tasks)]
        if not self.infer_reads_frames:
            out += [(self.prepared(t), self.infer_group(t)) for t in tasks]
        out += [(self.results, self.ALERT), (self.alerts, None), (self.deadletter, None)]
        return out
