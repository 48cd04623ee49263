"""A task's shadow model in the config, and the keys it uses in Redis."""

from __future__ import annotations

import pytest

from shared.config import ConfigError, load_config
from shared.keys import Keys


def models(**detect) -> dict:
    return {"models": {"detect": {"path": "/models/detect", **detect}}}


def test_a_shadow_runs_on_every_frame_unless_given_a_share():
    cfg = load_config(data=models(shadow="/models/detect-v2"), environ={})
    assert str(cfg.model("detect").shadow) == "/models/detect-v2" and cfg.model("detect").shadow_share == 1.0
    cfg = load_config(data=models(shadow="/models/detect-v2", shadow_share=0.25), environ={})
    assert cfg.model("detect").shadow_share == 0.25
    assert cfg.model("classify").shadow is None  # a task without a models entry has none


@pytest.mark.parametrize("share, why", [(0, "greater than 0"), (-0.5, "greater than 0"),
                                        (1.5, "less than or equal to 1")])
def test_the_share_is_a_fraction_above_zero_at_most_one(share, why):
    with pytest.raises(ConfigError) as info:
        load_config(data=models(shadow="/models/detect-v2", shadow_share=share), environ={})
    assert f"models.detect.shadow_share: Input should be {why}" in str(info.value)


def test_the_environment_sets_a_shadow():
    cfg = load_config(data=models(), environ={"PLANTSIGHT_MODELS__DETECT__SHADOW": "/m/v3",
                                              "PLANTSIGHT_MODELS__DETECT__SHADOW_SHARE": "0.5"})
    assert str(cfg.model("detect").shadow) == "/m/v3" and cfg.model("detect").shadow_share == 0.5


def test_shadow_keys_keep_their_names():
    k = Keys("p")
    assert (k.shadow, k.models_shadow, k.models_shadow_state) == ("p:shadow", "p:models:shadow",
                                                                  "p:models:shadow-state")
