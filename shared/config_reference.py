"""The configuration reference (docs/configuration.md), rendered from the schema in ``shared.config``.

The reference is generated rather than written so that it cannot drift from the schema: every key,
type, default, constraint and description comes from the pydantic models themselves, and a unit test
compares docs/configuration.md with ``render()``. Regenerate it with::

    plantsight config reference > docs/configuration.md      # or: python -m shared.config_reference

The walk is generic over pydantic v2 models: nested models, lists and dicts of models, Enums,
``Literal``, optional values, ``Field`` defaults and default factories, ``gt``/``ge``/``lt``/``le``,
length limits and patterns, and unions of models (a discriminated union such as
``Annotated[Union[...], Field(discriminator="type")]`` gets one section per variant, named by its
discriminator value). A ``SecretStr`` field never shows a value, only whether it has one.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Any

import annotated_types
from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from shared.config import ENV_PREFIX, Config

__all__ = ["render"]

HEADER = f"""\
<!-- Generated from the schema in shared/config.py: `plantsight config reference > docs/configuration.md`
     (or `python -m shared.config_reference`). Edit the schema's Field descriptions, not this file;
     a unit test compares the two. -->

# Configuration reference

plantsight reads one YAML file (`--config FILE`). It is checked at start against the schema below: an
unknown key, a wrong type or a value outside its bounds stops the service with a message that names the
key (`cameras[1].fps: …`). `plantsight config check FILE` validates a file and prints the effective
configuration with every secret masked.

Environment variables `{ENV_PREFIX}<SECTION>__<KEY>` override the file (`{ENV_PREFIX}REDIS__URL`,
`{ENV_PREFIX}INFERENCE__DEVICE=cuda`); their values are read as YAML scalars or lists. Secrets (`secret`
type below) never appear in logs, reprs or `config check`; prefer the `*_env` and `*_file` keys beside
them, which name an environment variable or a file that holds the secret.

In the tables, *required* marks a key without a default, and a type links to the section that describes it.
"""

_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", bytes: "bytes", SecretStr: "secret",
            type(None): "null", Any: "any"}


@dataclass
class _Section:
    path: str  # how the key is written, e.g. alerts.sinks[]
    model: type[BaseModel]
    anchor: str
    title: str
    intro: list[str] = field(default_factory=list)
    variants: list["_Section"] = field(default_factory=list)  # a union's members: the section lists them
    discriminator: str | None = None
    is_variant: bool = False
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)


def _anchor(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _cell(text: str) -> str:
    """Table-safe: one line, pipes escaped (GitHub tables split on them, even inside code spans)."""
    return " ".join(str(text).split()).replace("|", r"\|")


def _prose(text: str) -> str:
    """Schema prose as Markdown: ``<task>`` outside code spans would be read as an HTML tag and vanish."""
    parts = re.split(r"(`+[^`]*`+)", text)
    return "".join(p if p.startswith("`") else p.replace("<", "&lt;") for p in parts)


def _code(text: str) -> str:
    tick = "``" if "`" in text else "`"
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{tick}{pad}{text}{pad}{tick}"


def _doc(model: type) -> str:
    """The model's own docstring (not an inherited one, not BaseModel's), as one paragraph."""
    doc = model.__dict__.get("__doc__")
    if not doc or model in (BaseModel,):
        return ""
    return _prose(" ".join(inspect.cleandoc(doc).split()))


def _strip_annotated(tp: Any) -> tuple[Any, list]:
    """(the bare type, the metadata of every Annotated layer around it)."""
    meta: list = []
    while typing.get_origin(tp) is typing.Annotated:
        meta.extend(tp.__metadata__)
        tp = typing.get_args(tp)[0]
    return tp, meta


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _discriminator(meta: list, finfo: FieldInfo | None) -> str | None:
    for m in meta:
        if isinstance(m, FieldInfo) and isinstance(m.discriminator, str):
            return m.discriminator
    if finfo is not None and isinstance(finfo.discriminator, str):
        return finfo.discriminator
    return None


def _variant_tag(model: type[BaseModel], discriminator: str | None) -> str | None:
    """The discriminator value that selects ``model`` (its Literal field), if any."""
    if discriminator is None or discriminator not in model.model_fields:
        return None
    tp, _ = _strip_annotated(model.model_fields[discriminator].annotation)
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(str(v) for v in typing.get_args(tp))
    return None


_BOUNDS = (("gt", ">"), ("ge", "≥"), ("lt", "<"), ("le", "≤"))
_BOUND_TYPES = (annotated_types.Interval, annotated_types.Gt, annotated_types.Ge, annotated_types.Lt,
                annotated_types.Le)


def _constraints(meta: list, sized: str = "items") -> list[str]:
    """``gt``/``ge``/``lt``/``le``, length limits (in ``sized``: characters or items) and patterns, as words."""
    out = []
    for m in meta:
        if isinstance(m, _BOUND_TYPES):
            out += [f"{sign} {getattr(m, attr)}" for attr, sign in _BOUNDS if getattr(m, attr, None) is not None]
        elif isinstance(m, annotated_types.MultipleOf):
            out.append(f"a multiple of {m.multiple_of}")
        elif isinstance(m, annotated_types.MinLen):
            out.append(f"at least {m.min_length} {sized if m.min_length != 1 else sized[:-1]}")
        elif isinstance(m, annotated_types.MaxLen):
            out.append(f"at most {m.max_length} {sized if m.max_length != 1 else sized[:-1]}")
        elif getattr(m, "pattern", None) is not None:
            out.append(f"matching {_code(str(m.pattern))}")
    return out


def _sized(tp: Any) -> str:
    """What a length limit on ``tp`` counts."""
    tp, _ = _strip_annotated(tp)
    real = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else [tp]
    return "characters" if real and all(r in (str, bytes) for r in real) else "items"


def _group(text: str) -> str:
    """Parenthesise a compound type inside another (``map of string → (number or string)``)."""
    return f"({text})" if " or " in text or text.startswith("one of `") else text


def _literal(values: tuple) -> str:
    return "one of " + ", ".join(_code(json.dumps(v.value if isinstance(v, enum.Enum) else v)
                                       if not isinstance(v, str) else v) for v in values)


class _Walker:
    def __init__(self) -> None:
        self.sections: list[_Section] = []
        self.by_model: dict[type, _Section] = {}
        self.by_union: dict[tuple, _Section] = {}

    # --- types -----------------------------------------------------------------------------
    def type_text(self, tp: Any, path: str, finfo: FieldInfo | None = None) -> str:
        """Describe ``tp`` for a table cell, registering sections for the models inside it."""
        tp, meta = _strip_annotated(tp)
        text = self._bare(tp, meta, path, finfo)
        extra = _constraints(meta + (list(finfo.metadata) if finfo is not None else []), _sized(tp))
        return f"{text} ({', '.join(extra)})" if extra else text

    def _bare(self, tp: Any, meta: list, path: str, finfo: FieldInfo | None) -> str:
        if _is_union(tp):
            members = typing.get_args(tp)
            real = [m for m in members if m is not type(None)]
            models = [_strip_annotated(m)[0] for m in real]
            if len(real) > 1 and all(_is_model(m) for m in models):
                text = self._union(models, _discriminator(meta, finfo), path)
                return f"{text} or null" if len(real) < len(members) else text
            text = " or ".join(self.type_text(m, path) for m in real)
            return f"{text} or null" if len(real) < len(members) else text
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is typing.Literal:
            return _literal(args) if len(args) > 1 else _code(json.dumps(args[0]) if not isinstance(args[0], str)
                                                               else args[0])
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _literal(tuple(m.value for m in tp))
        if _is_model(tp):
            return self._model_link(tp, path)
        if origin in (list, set, frozenset) or (origin is tuple and len(args) == 2 and args[1] is Ellipsis):
            return f"list of {_group(self.type_text(args[0], path + '[]'))}"
        if origin is tuple:
            return "[" + ", ".join(self.type_text(a, path) for a in args) + "]"
        if origin is dict or origin is typing.Mapping:
            key, value = args if args else (Any, Any)
            return f"map of {_group(self.type_text(key, path))} → {_group(self.type_text(value, path + '.<key>'))}"
        if isinstance(tp, type) and issubclass(tp, PurePath):
            return "path"
        if tp in _SCALARS:
            return _SCALARS[tp]
        if isinstance(tp, type) and issubclass(tp, SecretStr):
            return "secret"
        return getattr(tp, "__name__", str(tp))

    def _model_link(self, model: type[BaseModel], path: str) -> str:
        section = self.by_model.get(model)
        if section is None:
            section = _Section(path, model, _anchor(path), _code(path))
            self.by_model[model] = section
            self.sections.append(section)
            self.walk(section)
        return f"[{model.__name__}](#{section.anchor})"

    def _union(self, models: list[type[BaseModel]], discriminator: str | None, path: str) -> str:
        by = f", chosen by `{discriminator}`" if discriminator else ""
        seen = self.by_union.get((*models, discriminator))
        if seen is not None:  # the same union again: link to its sections
            return f"[one of {len(models)} kinds](#{seen.anchor}){by}"
        union = _Section(path, models[0], _anchor(path), _code(path), discriminator=discriminator)
        self.by_union[(*models, discriminator)] = union
        self.sections.append(union)
        if discriminator:
            union.intro.append(f"One of the kinds below, chosen by its `{discriminator}` key; each kind takes "
                               "only its own keys.")
        else:
            union.intro.append("One of the kinds below.")
        for model in models:
            tag = _variant_tag(model, discriminator)
            label = f"{discriminator}: {tag}" if tag is not None else model.__name__
            variant = _Section(path, model, _anchor(f"{path} {tag or model.__name__}"),
                               f"{_code(path)} with {_code(label)}" if tag is not None else
                               f"{_code(path)}: {model.__name__}", discriminator=discriminator, is_variant=True)
            self.by_model.setdefault(model, variant)
            union.variants.append(variant)
        for variant in union.variants:
            self.sections.append(variant)
            self.walk(variant)
        return f"[one of {len(models)} kinds](#{union.anchor}){by}"

    # --- defaults ----------------------------------------------------------------------------
    def default_text(self, finfo: FieldInfo) -> str:
        if finfo.is_required():
            return "*required*"
        if finfo.default_factory is not None:
            try:
                value = finfo.default_factory()  # type: ignore[call-arg]
            except TypeError:  # a factory that takes the validated data: no static default
                return "(computed)"
        else:
            value = finfo.default
        if value is PydanticUndefined:
            return ""
        if _contains_secret(finfo.annotation):
            return "`null`" if value is None else "(set, hidden)"
        if isinstance(value, BaseModel) and value == type(value)():
            return "`{}` (every key at its default)"
        return _code(_value(value))

    # --- sections ----------------------------------------------------------------------------
    def rows(self, section: _Section) -> list[tuple[str, str, str, str]]:
        fields = list(section.model.model_fields.items())
        if section.discriminator and section.discriminator in section.model.model_fields:
            fields.sort(key=lambda kv: kv[0] != section.discriminator)  # the kind first, the rest in order
        out = []
        for name, finfo in fields:
            key = finfo.alias or name
            child = f"{section.path}.{key}" if section.path else key
            out.append((_code(key), self.type_text(finfo.annotation, child, finfo), self.default_text(finfo),
                        _prose(finfo.description or "")))
        return out

    def walk(self, section: _Section) -> None:
        section.rows = self.rows(section)


def _contains_secret(tp: Any) -> bool:
    tp, _ = _strip_annotated(tp)
    if isinstance(tp, type) and issubclass(tp, SecretStr):
        return True
    return any(_contains_secret(a) for a in typing.get_args(tp) if a is not Ellipsis)


def _plain(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return _plain(value.model_dump(mode="python", by_alias=True))
    if isinstance(value, SecretStr):
        return "**********"
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, dict):
        return {str(_plain(k)): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v) for v in value]
    return value


def _value(value: Any) -> str:
    """A default as it would be written in the YAML file (flow style)."""
    value = _plain(value)
    if isinstance(value, str):
        return value if value and value.strip() == value and not re.search(r"^[-?:,\[\]{}#&*!|>'\"%@`]|: | #", value) \
            else json.dumps(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    return json.dumps(value)


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    lines = ["| key | type | default | description |", "|---|---|---|---|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render(root: type[BaseModel] = Config) -> str:
    """docs/configuration.md: the header, the top-level keys of ``root``, then one section per model
    reached from them (a union of models: one section listing its kinds, then one per kind)."""
    walker = _Walker()
    top = _Section("", root, "top-level-keys", "Top-level keys")
    walker.walk(top)
    out = [HEADER.rstrip("\n"), "", f'<a id="{top.anchor}"></a>', "", f"## {top.title}", ""]
    if _doc(root):
        out += [_doc(root), ""]
    out += _table(top.rows) + [""]
    for section in walker.sections:
        depth = "###" if section.is_variant else "##"
        out += [f'<a id="{section.anchor}"></a>', "", f"{depth} {section.title}", ""]
        if section.variants:
            out += [*section.intro, ""]
            out += [f"- [{v.title}](#{v.anchor}){': ' + _doc(v.model) if _doc(v.model) else ''}"
                    for v in section.variants]
            out.append("")
            continue
        if _doc(section.model):
            out += [_doc(section.model), ""]
        out += _table(section.rows) + [""]
    return "\n".join(out).rstrip("\n") + "\n"


if __name__ == "__main__":
    print(render(), end="")
