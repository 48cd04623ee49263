"""Alert sinks: each reads ``{P}:alerts`` through its own consumer group and delivers at least once.

``worker.py`` owns delivery (consumer group, retries, deadline, rate limit, dead letters); each
sink type is a small target module that turns an alert into its wire format: ``webhook.py``
(signed JSON or a Jinja2 template), ``chat.py`` (Slack, Teams), ``mqtt.py``, ``alertmanager.py``.
The alert id is the idempotency key everywhere.
"""

from services.alerting.sinks.base import Context, Delivery, Target, links
from services.alerting.sinks.registry import SINK_TYPES, LogSink, make_target
from services.alerting.sinks.webhook import WebhookSink, sign
from services.alerting.sinks.worker import SHUTDOWN, SinkWorker

__all__ = ["Context", "Delivery", "LogSink", "SHUTDOWN", "SINK_TYPES", "SinkWorker", "Target", "WebhookSink",
           "links", "make_target", "sign"]
