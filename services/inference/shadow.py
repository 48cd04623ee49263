"""Shadow models: a candidate model version runs beside a task's live model on a share of its frames.

The shadow runs on the batch the live model has just run, on the same prepared tensors, after the live
results are written and acknowledged: it never delays them. Its results go to ``{P}:shadow`` (never to
``{P}:results``, so alerting never sees them), and each compared frame's agreement with the live model
(``shared/agreement.py``) goes to ``plantsight_shadow_agreement`` (thermal:
``plantsight_shadow_max_k_difference_kelvin``) and to the running totals each worker records in
``{P}:models:shadow-state`` for the viewer.

Which shadow a task runs is learnt as its live model is (``swap.py``): ``{P}:models:shadow`` (written by
``plantsight models shadow``), else ``models.<task>.shadow`` in the config. A shadow that fails to load,
or raises on frames, is dropped: logged once, counted in ``plantsight_shadow_failures_total``, and not
loaded again until its directory changes; the live model is never touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.models import Predictor


def reason(e: BaseException) -> str:
    """An exception as one log line: its first line and, for a long one such as a TorchScript traceback, its
    last (where the error raised inside the network is named)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [""]
    text = lines[0][:300] + (f" … {lines[-1][:200]}" if len(lines) > 1 else "")
    return f"{type(e).__name__}: {text}"


@dataclass
class Shadow:
    predictor: Predictor
    path: str
    fp: tuple
    share: float
    credit: float = 0.0  # the share carried over between batches (see pick)
    live: str = ""  # the live model the totals below compare against
    frames: int = 0
    total: float = 0.0
    state: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.predictor.name

    def pick(self, n: int) -> list[int]:
        """Which of a batch's ``n`` frames the shadow runs on: every frame at share 1, else evenly spread
        frames whose count follows the share exactly over time (0.25: one in four, whatever the batch sizes)."""
        out = []
        for i in range(n):
            self.credit += self.share
            if self.credit >= 1.0 - 1e-9:
                self.credit -= 1.0
                out.append(i)
        return out

    def count(self, live: str, value: float) -> None:
        """Add one compared frame to the running totals, which start again when the live model changes."""
        if live != self.live:
            self.live, self.frames, self.total = live, 0, 0.0
        self.frames += 1
        self.total += value

    def record(self) -> dict:
        return {"state": "running", "live": self.live, "shadow": self.name, "path": self.path, "share": self.share,
                "frames": self.frames, "mean": (self.total / self.frames) if self.frames else None}
