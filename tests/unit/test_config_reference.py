"""docs/configuration.md is the schema rendered, byte for byte, so the reference cannot drift from the code;
the renderer documents every kind of a discriminated union and never shows a secret."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Annotated, Literal, Union

from pydantic import BaseModel, Field, SecretStr

from shared.config import Config
from shared.config_reference import render
from tests.support.paths import ROOT

DOC = ROOT / "docs" / "configuration.md"
REGENERATE = ("docs/configuration.md is out of date with shared/config.py; regenerate it with\n"
              "    plantsight config reference > docs/configuration.md\n"
              "or  python -m shared.config_reference > docs/configuration.md")


def test_the_committed_reference_is_the_rendered_schema():
    assert DOC.read_text() == render(), REGENERATE


def test_every_top_level_key_is_in_the_reference():
    text = render()
    top = text.split("## Top-level keys", 1)[1].split("\n## ", 1)[0]
    for name, info in Config.model_fields.items():
        assert f"| `{info.alias or name}` |" in top, f"top-level key {name} missing from the reference"


def test_every_section_and_sink_kind_has_its_own_table():
    text = render()
    for path in ("redis", "cameras[]", "models.<key>", "services.<key>", "streams", "inference", "alerts",
                 "alerts.rules[]", "alerts.sinks[]"):
        assert f"## `{path}`\n" in text, path
    kinds = re.findall(r"^### `alerts\.sinks\[\]` with `type: (\w+)`$", text, re.M)
    assert {"webhook", "mqtt", "log"} <= set(kinds) and len(set(kinds)) == len(kinds), kinds


def test_the_module_prints_the_reference():
    out = subprocess.run([sys.executable, "-m", "shared.config_reference"], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert out == render()


class _Kind1(BaseModel):
    """The first kind."""

    kind: Literal["one"]
    token: SecretStr = SecretStr("do-not-print-me")
    size: int = Field(3, gt=0, le=9, description="how | big")


class _Kind2(BaseModel):
    kind: Literal["two"]
    colour: Literal["red", "blue"] = "red"
    limit: float | None = None


class _Holder(BaseModel):
    pick: list[Annotated[Union[_Kind1, _Kind2], Field(discriminator="kind")]] = Field(default_factory=list)
    password: SecretStr | None = None


class _Root(BaseModel):
    holder: _Holder = _Holder()
    name: str = Field(min_length=1, description="who <owner> is")


def test_the_renderer_on_a_small_schema():
    text = render(_Root)
    assert "do-not-print-me" not in text and "(set, hidden)" in text
    assert re.search(r"^### `holder\.pick\[\]` with `kind: one`$", text, re.M)
    assert re.search(r"^### `holder\.pick\[\]` with `kind: two`$", text, re.M)
    assert "| `size` | integer (> 0, ≤ 9) | `3` | how \\| big |" in text
    assert "| `colour` | one of `red`, `blue` | `red` |  |" in text
    assert "| `limit` | number or null | `null` |  |" in text
    assert "| `name` | string (at least 1 character) | *required* | who &lt;owner> is |" in text
    assert "The first kind." in text
    first, second = text.index("kind: one`\n"), text.index("kind: two`\n")
    assert text.index("| `kind` | `one` |", first) < text.index("| `token` |", first) < second
