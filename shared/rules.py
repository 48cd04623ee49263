"""Alert conditions: a tiny safe expression language over a result's fields (no ``eval``).

``max_k >= 450``, ``label == "anomaly" and prob.anomaly > 0.8``, ``count.leak >= 1 or defect_ratio > 0.02``.
Allowed: field names (dots for sub-fields), numbers, strings, comparisons, ``and``/``or``/``not``,
parentheses. A condition is parsed once (at config load) into a Python closure.
"""

from __future__ import annotations

import ast
import operator
import re
import warnings
from typing import Any, Callable

_CMP = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FIELD = re.compile(r"(?<![\w.])[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*")  # not inside a number (1e5)

Condition = Callable[[dict], bool]


class RuleError(ValueError):
    """A condition that is not in the rule language; the message says where."""


def _field_names(expr: str) -> tuple[str, dict[str, str]]:
    """Replace dotted field names (``prob.anomaly``, ``count.hot_spot``) with plain identifiers for ``ast``."""
    names: dict[str, str] = {}

    def sub(m: re.Match) -> str:
        word = m.group(0)
        if word in ("and", "or", "not", "True", "False"):
            return word
        key = f"_f{len(names)}"
        names[key] = word
        return key

    out, pos = [], 0
    for m in re.finditer(r"\"[^\"]*\"|'[^']*'", expr):  # leave string literals alone
        out.append(_FIELD.sub(sub, expr[pos:m.start()]))
        out.append(m.group(0))
        pos = m.end()
    out.append(_FIELD.sub(sub, expr[pos:]))
    return "".join(out), names


def compile_condition(expr: str) -> Condition:
    """Parse ``expr`` into a function of a flat field dict; RuleError names what is not allowed."""
    if not isinstance(expr, str) or not expr.strip():
        raise RuleError("empty condition")
    text, names = _field_names(expr)
    try:
        with warnings.catch_warnings():  # "450and" is only a warning today: refuse it always, not per filter
            warnings.simplefilter("error", SyntaxWarning)
            tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        raise RuleError(f"cannot parse {expr!r}: {e.msg}") from None

    def build(node: ast.AST) -> Callable[[dict], Any]:
        if isinstance(node, ast.BoolOp):
            parts = [build(v) for v in node.values]
            if isinstance(node.op, ast.And):
                return lambda f: all(p(f) for p in parts)
            return lambda f: any(p(f) for p in parts)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            inner = build(node.operand)
            return lambda f: not inner(f)
        if (isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and isinstance(node.operand, ast.Constant)
                and type(node.operand.value) in (int, float)):
            value = -node.operand.value
            return lambda f: value
        if isinstance(node, ast.Compare):
            left = build(node.left)
            pairs = [(_CMP[type(op)], build(c)) for op, c in zip(node.ops, node.comparators) if type(op) in _CMP]
            if len(pairs) != len(node.ops):
                raise RuleError(f"only < <= > >= == != are allowed in {expr!r}")

            def compare(f: dict) -> bool:
                a = left(f)
                for op, right in pairs:
                    b = right(f)
                    if a is None or b is None:
                        return False
                    try:
                        if not op(a, b):
                            return False
                    except TypeError:  # e.g. a label compared with a number: simply not true
                        return False
                    a = b
                return True

            return compare
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
            value = node.value
            return lambda f: value
        if isinstance(node, ast.Name) and node.id in names:
            key = names[node.id]
            return lambda f: f.get(key)
        shown = re.sub(r"\b_f\d+\b", lambda m: names.get(m.group(0), m.group(0)), ast.unparse(node))
        raise RuleError(f"{shown!r} is not allowed in a condition ({expr!r})")

    fn = build(tree)
    return lambda fields: bool(fn(fields))


def fields_of(task: str, out: dict) -> dict[str, Any]:
    """The flat fields a rule can use for one task's result ``out`` (documented in the README)."""
    f: dict[str, Any] = {}
    if task == "classify":
        f["label"] = out.get("label")
        f["index"] = out.get("index")
        for name, p in zip(out.get("classes", []), out.get("probs", [])):
            f[f"prob.{name}"] = p
        f["prob"] = max(out.get("probs") or [0.0])
    elif task == "detect":
        boxes, classes = out.get("boxes", []), out.get("classes", [])
        f["count"] = len(boxes)
        for name in classes:
            f[f"count.{name}"] = 0
            f[f"max_score.{name}"] = 0.0
        for b in boxes:
            name = classes[int(b[5])] if 0 <= int(b[5]) < len(classes) else str(int(b[5]))
            f[f"count.{name}"] = f.get(f"count.{name}", 0) + 1
            f[f"max_score.{name}"] = max(f.get(f"max_score.{name}", 0.0), float(b[4]))
        f["max_score"] = max([float(b[4]) for b in boxes], default=0.0)
    elif task == "segment":
        regions = out.get("regions", [])
        f["defect_ratio"] = out.get("defect_ratio", 0.0)
        f["regions"] = len(regions)
        f["max_region_area"] = max([r[4] for r in regions], default=0)
    elif task == "thermal":
        for k in ("max_k", "avg_k", "min_k"):
            f[k] = out.get(k)
        f["hotspots"] = len(out.get("hotspots", []))
    return f


def threshold_of(expr: str) -> float | None:
    """The first number in a condition, reported with the alert as its threshold."""
    text = _field_names(re.sub(r"\"[^\"]*\"|'[^']*'", "", expr))[0]  # no digits of field names or strings
    m = re.search(r"(?<![\w.])-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", text)
    return float(m.group(0)) if m else None


def value_of(expr: str, fields: dict) -> float:
    """The first numeric field the condition reads, reported with the alert as its value."""
    for m in _FIELD.finditer(re.sub(r"\"[^\"]*\"|'[^']*'", "", expr)):
        v = fields.get(m.group(0))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 1.0
