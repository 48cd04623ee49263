"""ingest: reads the cameras (``cameras``: the sources) and publishes frames (``service``)."""
