"""Model swap without downtime, on the real pipeline: a new version in the model directory and a
`plantsight models deploy` are switched in between batches; a broken model directory is refused and the
running model stays; every frame gets exactly one result across the swaps."""

from __future__ import annotations

import collections
import json
import subprocess
import sys

import pytest

from shared.keys import Keys
from tests.support.environment import env_without_plantsight
from tests.support.paths import ROOT
from tests.support.pipeline import groups_idle
from tests.support.small_models import model_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def deploy(up, task: str, path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "models", "deploy", task, str(path), "--config",
                           str(up.path), "--wait", "90"], cwd=ROOT, env=env_without_plantsight(),
                          capture_output=True, text=True, timeout=120)


def test_models_swap_between_batches_with_no_frame_lost_or_repeated(up_pipeline, r, tmp_path):
    live = model_dir(tmp_path / "live", "v1", 1)
    n = 1200  # 30 s of camera; the three switches (each CLI call imports torch) took 12 s on a slow 2-core VM
    cams = [{"id": "s1", "source": "synthetic://process?w=160&h=120", "fps": 40, "tasks": ["classify"],
             "on_full": "block", "max_frames": n}]
    up = up_pipeline(cams, models={"classify": {"path": str(live)}},
                     inference={"device": "cpu", "max_batch": 4, "max_wait_ms": 30, "threads": 1, "model_poll_s": 0.3})
    models = lambda: [m["model"] for m in up.results()]  # noqa: E731
    up.wait_for(lambda: "simple_cnn@v1" in models(), 120, "results from v1")

    # 1. A new version written into the configured directory is noticed, loaded, warmed and switched in.
    model_dir(live, "v2", 2)
    up.wait_for(lambda: "simple_cnn@v2" in models(), 60, "the switch to v2")

    # 2. A broken directory is refused: the running model stays and the refusal is recorded with its reason.
    broken = model_dir(tmp_path / "broken", "v-broken", 3)
    (broken / "model.pt").write_bytes(b"not a state dict")
    done = deploy(up, "classify", broken)
    assert done.returncode == 1, done.stdout + done.stderr
    rec = json.loads(r.hget(Keys(up.prefix).models_active, "classify"))
    assert rec["model"] == "simple_cnn@v2" and "not a loadable state dict" in rec["refused"]

    # 3. `plantsight models deploy` switches to another directory.
    other = model_dir(tmp_path / "other", "v3", 4)
    done = deploy(up, "classify", other)
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["model"] == "simple_cnn@v3"
    up.wait_for(lambda: "simple_cnn@v3" in models(), 60, "results from v3")

    up.wait_for(lambda: len(up.results()) >= n, 180, f"all {n} results")
    up.wait_for(lambda: groups_idle(r, up.prefix, ["classify"]), 30, "nothing pending")
    results = up.results()
    counts = collections.Counter((m["camera"], m["seq"]) for m in results)
    assert set(counts) == {("s1", s) for s in range(n)} and max(counts.values()) == 1
    # Switches happen between batches and only forward: v1 … v2 … v3, never back, never the broken one.
    order = [m["model"] for m in results]
    changes = [order[0]] + [b for a, b in zip(order, order[1:]) if a != b]
    assert changes == ["simple_cnn@v1", "simple_cnn@v2", "simple_cnn@v3"]
    info = {dict(lab)["version"]: v for (name, lab), v in up.metrics("infer").items()
            if name == "plantsight_model_info" and dict(lab)["task"] == "classify"}
    assert info == {"v3": 1.0}
    assert up.counter("ingest", "plantsight_frames_dropped_total") == 0
    assert up.stop() == 0
