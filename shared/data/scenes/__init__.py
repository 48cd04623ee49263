"""Synthetic plant scenes: deterministic renderers for ``synthetic://<scene>`` cameras and datasets.

Every scene is a pure function of ``(seed, seq)``: ``Scene(seed=s).render(q)`` gives the same
bytes on every call, in every process. Seed-only work (textures, sensor-noise tables) is done once
in ``__init__``; ``render`` only moves, draws and blends, so a frame costs a few milliseconds.

Images are RGB ``uint8`` H×W×3, except ``thermal``: radiometric ``uint16`` H×W×1 in centikelvin.

Anomalies come in episodes. Frames are grouped in blocks of ``EPISODE_BLOCK`` (20); a fraction of
the blocks, evenly spread with a seed-dependent phase, holds one episode of consecutive anomalous
frames (10 frames at rates up to 0.5, longer above) at a seed-dependent offset, so that on average
a fraction ``anomaly_rate`` of all frames is anomalous and a rule with ``for_frames: 3`` can fire.
At the default rate 0.1 every 100 frames hold exactly one 10-frame episode.

=============  ===========  ==============================================================
scene          default W×H  truth
=============  ===========  ==============================================================
``process``    320×240      ``{"label": "normal"|"anomaly", "index": 0|1}``
``equipment``  448×448      ``{"boxes": [[x1, y1, x2, y2, cls], ...]}`` (ints, pixels, x2/y2 inclusive)
``surface``    256×256      ``{"mask": uint8 H×W 0/1, "defects": ["scratch"|"stain"|"crack", ...]}``
``thermal``    160×120      ``{"max_k", "avg_k", "min_k", "hotspots": [[x, y, peak_k], ...]}``
=============  ===========  ==============================================================

Every truth also holds ``"anomaly": bool`` and ``"kind"`` (the episode's anomaly kind, or None).

Each scene lives in its own module (``process``, ``equipment``, ``surface``, ``thermal``), so a
renderer is read and changed on its own; ``base`` holds what they share: the ``Scene`` base class
and its episodes, the registry, the seed hashing, ``make_scene`` and ``scene_from_source``.
Importing this package imports every scene module, in the order of ``SCENES``, so the registry is
complete wherever a scene can be made. Import from the package, not from its modules.
"""

from __future__ import annotations

from .base import EPISODE_BLOCK, MIN_SIZE, SCENE_TYPES, SCENES, Scene, make_scene, register, scene_from_source

# In the order of SCENES: the registry keeps the order it is filled in, and errors list it.
# isort: off
from .process import ProcessScene
from .equipment import EquipmentScene
from .surface import SurfaceScene
from .thermal import ThermalScene
# isort: on

__all__ = ["EPISODE_BLOCK", "MIN_SIZE", "SCENES", "SCENE_TYPES", "Scene", "make_scene", "register",
           "scene_from_source", "ProcessScene", "EquipmentScene", "SurfaceScene", "ThermalScene"]
