"""The model's CPU counter (shared.metrics.ModelCpu): torch's worker threads count, Python's threads do not."""

from __future__ import annotations

import json
import subprocess
import sys

from prometheus_client import CollectorRegistry, generate_latest

from shared.metrics import ModelCpu
from tests.support.paths import ROOT

MEASURE = """
import json, threading, time
import torch
from shared.metrics import native_thread_cpu_s
from tests.support.cpu import burn
torch.set_num_threads(2)  # torch with one worker thread beside the caller's
before = native_thread_cpu_s()
burnt, leave = threading.Event(), threading.Event()
def work():
    burn(0.3)
    burnt.set()
    leave.wait()  # alive while it is measured: see native_thread_cpu_s on a thread that has just ended
worker = threading.Thread(target=work)
worker.start()
burn(0.1)  # the main thread is Python's too
burnt.wait()
mid = native_thread_cpu_s()
leave.set()
worker.join()
a = torch.randn(768, 768)
t0 = time.monotonic()
while time.monotonic() - t0 < 0.6:
    a @ a  # torch splits this between this thread and its intra-op workers
print(json.dumps({"python_threads": mid - before, "torch": native_thread_cpu_s() - mid}))
"""


def test_native_thread_cpu_counts_torch_workers_and_not_python_threads():
    """The Python worker is measured while it is alive: one joined a moment before may still be in /proc,
    where a loaded machine would count its CPU as native. In a process of its own, so that
    native threads earlier tests left in the session (ONNX Runtime's, OpenMP's) cannot add their CPU."""
    done = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    cpu = json.loads(done.stdout)
    assert cpu["python_threads"] < 0.05, "CPU of Python threads was counted as the model's"
    assert cpu["torch"] > 0.05, "torch's worker threads were not counted"


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
