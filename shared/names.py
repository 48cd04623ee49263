"""The names plantsight's parts go by: the tasks a camera can feed and the services that run.

Redis key names are in ``keys.py`` and metric names in ``metrics.py``; everything else refers to these.
"""

TASKS = ("classify", "detect", "segment", "thermal")
SERVICES = ("ingest", "preprocess", "infer", "alert", "viewer")
PIPELINE = ("ingest", "preprocess", "infer", "alert")  # what carries a frame to an alert; the viewer only watches
DEFAULT_PORTS = {"ingest": 9101, "preprocess": 9102, "infer": 9103, "alert": 9104, "viewer": 8080}
