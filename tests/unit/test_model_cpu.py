"""The model's CPU counter (shared.metrics.ModelCpu): torch's worker threads count, Python's threads do not."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from shared.metrics import ModelCpu, native_thread_cpu_s


def burn(seconds: float) -> None:
    t0 = time.thread_time()
    while time.thread_time() - t0 < seconds:
        sum(range(1000))


@pytest.fixture
def two_torch_threads():
    """torch with one worker thread beside the caller's (an earlier test may have set one thread)."""
    was = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(was)


def test_native_thread_cpu_counts_torch_workers_and_not_python_threads(two_torch_threads):
    before = native_thread_cpu_s()
    worker = threading.Thread(target=burn, args=(0.3,))
    worker.start()
    burn(0.1)  # the main thread is Python's too
    worker.join()
    mid = native_thread_cpu_s()
    assert mid - before < 0.05, "CPU of Python threads was counted as the model's"
    a = torch.randn(768, 768)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.6:
        a @ a  # torch splits this between this thread and its intra-op workers
    assert native_thread_cpu_s() - mid > 0.05, "torch's worker threads were not counted"


def test_model_cpu_adds_the_batches_thread_time_and_never_goes_back():
    m = ModelCpu()
    first = m.seconds()
    m.add(1.5)
    assert m.seconds() >= first + 1.5
    m._in_predict -= 10  # as if a worker thread had ended and taken its time with it
    assert m.seconds() >= first + 1.5
    registry = CollectorRegistry()
    registry.register(m)
    line = [ln for ln in generate_latest(registry).decode().splitlines() if not ln.startswith("#")]
    assert line[0].startswith("plantsight_model_cpu_seconds_total ") and float(line[0].split()[1]) >= first + 1.5
