"""Alert conditions: a tiny safe expression language over a result's fields (no ``eval``).

``max_k >= 450``, ``label == "anomaly" and prob.anomaly > 0.8``, ``count.leak >= 1 or defect_ratio > 0.02``.
Allowed: field names (dots for sub-fields), numbers, strings, comparisons, ``and``/``or``/``not``,
parentheses. A condition is parsed once (at config load) into a Python closure; `check_names` refuses
a name that is neither a field of the rule's task (`TASK_FIELDS`) nor one of the rule's ``params``.

Fields are computed by `fields_of`, over the whole frame or over a zone (a polygon in original frame
pixels, `Zone`); ``rise_k_per_min`` comes from a `RiseWindow` of recent ``max_k`` values.
"""

from __future__ import annotations

import ast
import bisect
import math
import operator
import re
import warnings
from collections import deque
from typing import Any, Callable, Iterable, Mapping

import numpy as np

_CMP = {ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Lt: operator.lt, ast.LtE: operator.le,
        ast.Eq: operator.eq, ast.NotEq: operator.ne}
_FIELD = re.compile(r"(?<![\w.])[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_-]+)*")  # not inside a number (1e5)



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


def compile_condition(expr: str) -> "Condition":
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

    return Condition(expr, build(tree), tuple(dict.fromkeys(names.values())))


class Condition:
    """A parsed condition: call it with a flat field dict; ``names`` are the fields it reads, in order."""

    def __init__(self, expr: str, fn: Callable[[dict], Any], names: tuple[str, ...]):
        self.expr, self._fn, self.names = expr, fn, names

    def __call__(self, fields: Mapping[str, Any]) -> bool:
        return bool(self._fn(fields))

    def __repr__(self) -> str:
        return f"Condition({self.expr!r})"


# The documented fields of each task (README "Alert rules"); a name ending in "." takes any suffix
# (a class name of the model), so ``count.leak`` is known without loading the model.
TASK_FIELDS: dict[str, tuple[str, ...]] = {
    "classify": ("label", "index", "prob", "prob."),
    "detect": ("count", "count.", "max_score", "max_score."),
    "segment": ("defect_ratio", "regions", "max_region_area", "anomaly_area", "anomaly_score"),
    "thermal": ("max_k", "avg_k", "min_k", "hotspots", "rise_k_per_min"),
}
KEYWORDS = ("True", "False")


def known_field(task: str, name: str) -> bool:
    for f in TASK_FIELDS.get(task, ()):
        if name == f or (f.endswith(".") and name.startswith(f) and len(name) > len(f)):
            return True
    return False


def check_names(cond: Condition, task: str, params: Iterable[str] = ()) -> None:
    """RuleError naming the first name in ``cond`` that is neither a field of ``task`` nor a param."""
    params = set(params)
    for name in cond.names:
        if name not in params and not known_field(task, name):
            known = ", ".join(f + "<class>" if f.endswith(".") else f for f in TASK_FIELDS.get(task, ()))
            extra = f"; params: {', '.join(sorted(params))}" if params else ""
            raise RuleError(f"unknown field {name!r} for task {task} in {cond.expr!r} (fields: {known}{extra})")


class Zone:
    """A named polygon in original frame pixels; a rule scoped to it sees only what lies inside."""

    def __init__(self, name: str, points: Iterable[Iterable[float]]):
        self.name = name
        self.points = np.asarray([[float(x), float(y)] for x, y in points], dtype=np.float64)
        self._masks: dict[tuple[int, int], np.ndarray] = {}

    def contains(self, x: float, y: float) -> bool:
        """Whether (x, y) lies inside the polygon (even-odd rule; a point on an edge may go either way)."""
        inside, pts = False, self.points
        for i in range(len(pts)):
            (x1, y1), (x2, y2) = pts[i - 1], pts[i]
            if (y1 > y) != (y2 > y) and x < x1 + (y - y1) * (x2 - x1) / (y2 - y1):
                inside = not inside
        return inside

    def mask(self, h: int, w: int) -> np.ndarray:
        """Boolean ``h``×``w`` mask of the pixels whose centre lies inside (cached per size)."""
        m = self._masks.get((h, w))
        if m is None:
            ys, xs = np.mgrid[0:h, 0:w]
            px, py = xs.ravel() + 0.5, ys.ravel() + 0.5
            inside = np.zeros(px.shape, bool)
            pts = self.points
            for i in range(len(pts)):  # the same even-odd test as `contains`, for every pixel at once
                (x1, y1), (x2, y2) = pts[i - 1], pts[i]
                if y1 == y2:
                    continue
                cross = ((y1 > py) != (y2 > py)) & (px < x1 + (py - y1) * (x2 - x1) / (y2 - y1))
                inside ^= cross
            m = self._masks[(h, w)] = inside.reshape(h, w)
        return m


def _centre_in(zone: Zone | None, x: float, y: float) -> bool:
    return zone is None or zone.contains(x, y)


def fields_of(task: str, out: dict, zone: Zone | None = None, *, kelvin: np.ndarray | None = None,
              mask: np.ndarray | None = None) -> dict[str, Any]:
    """The flat fields a rule can use for one task's result ``out`` (documented in the README).

    With a ``zone``: detect counts boxes whose centre lies inside; segment measures the defect mask
    (``mask``: the result's mask decoded, 0/255, frame size) inside the zone and keeps regions whose
    centre lies inside; thermal counts hot spots inside and, given ``kelvin`` (the radiometric frame
    in kelvin), computes max/avg/min over the zone's pixels; without it, ``max_k`` is the hottest
    hot spot inside the zone (missing when none) and ``avg_k``/``min_k`` are missing.
    """
    f: dict[str, Any] = {}
    if task == "classify":
        f["label"] = out.get("label")
        f["index"] = out.get("index")
        for name, p in zip(out.get("classes", []), out.get("probs", [])):
            f[f"prob.{name}"] = p
        f["prob"] = max(out.get("probs") or [0.0])
    elif task == "detect":
        classes = out.get("classes", [])
        boxes = [b for b in out.get("boxes", []) if _centre_in(zone, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2)]
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
        regions = [r for r in out.get("regions", []) if _centre_in(zone, r[0] + r[2] / 2, r[1] + r[3] / 2)]
        if zone is None:
            f["defect_ratio"] = out.get("defect_ratio", 0.0)
        elif mask is not None:
            inside = zone.mask(*mask.shape[:2])
            f["defect_ratio"] = float(np.count_nonzero(mask[inside])) / max(1, int(inside.sum()))
        else:
            f["defect_ratio"] = None
        f["regions"] = len(regions)
        f["max_region_area"] = max([r[4] for r in regions], default=0)
        f["anomaly_area"] = sum(r[4] for r in regions)
        f["anomaly_score"] = out.get("score")  # the frame's highest defect (anomaly) probability, zone or not
    elif task == "thermal":
        spots = [s for s in out.get("hotspots", []) if _centre_in(zone, s[0], s[1])]
        if zone is None:
            for k in ("max_k", "avg_k", "min_k"):
                f[k] = out.get(k)
        elif kelvin is not None and zone.mask(*kelvin.shape[:2]).any():
            pixels = kelvin[zone.mask(*kelvin.shape[:2])]
            f["max_k"], f["avg_k"], f["min_k"] = (round(float(pixels.max()), 3), round(float(pixels.mean()), 3),
                                                  round(float(pixels.min()), 3))
        else:
            f["max_k"] = max((float(s[2]) for s in spots), default=None)
            f["avg_k"] = f["min_k"] = None
        f["hotspots"] = len(spots)
    return f


class RiseWindow:
    """Recent ``(t, max_k)`` of one camera (and zone); ``rate(window_s)`` is the rise in K per minute.

    The rate is the least-squares slope over the samples of the last ``window_s`` seconds, so one
    noisy frame does not make a trend. It is None (a rule on it does not hold) until the samples
    span at least half the window. A result that arrives late (replicas reorder a camera's frames) is
    put in its place; one from further back than ``keep_s`` (a restarted camera clock) starts again.
    """

    def __init__(self, keep_s: float):
        self.keep_s = keep_s
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, t: float, value: float | None) -> None:
        if value is None or not math.isfinite(float(value)):
            return
        if self.samples and t < self.samples[-1][0]:
            if t < self.samples[-1][0] - self.keep_s:
                self.samples.clear()
            else:
                at = bisect.bisect(self.samples, (t, float(value)))
                self.samples.insert(at, (t, float(value)))
                return
        self.samples.append((t, float(value)))
        while self.samples and self.samples[0][0] < t - self.keep_s:
            self.samples.popleft()

    def rate(self, window_s: float) -> float | None:
        if not self.samples:
            return None
        end = self.samples[-1][0]
        pts = [(t, v) for t, v in self.samples if t >= end - window_s]
        if len(pts) < 2 or pts[-1][0] - pts[0][0] < window_s / 2:
            return None
        ts = np.array([p[0] for p in pts]) - pts[0][0]
        vs = np.array([p[1] for p in pts])
        dt = ts - ts.mean()
        return round(float((dt * (vs - vs.mean())).sum() / (dt * dt).sum()) * 60.0, 3)


_NUMBER = r"(?<![\w.])-?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?"


def threshold_of(expr: str, params: Mapping[str, Any] | None = None) -> float | None:
    """The first number in a condition (or numeric param it names), reported with the alert as its threshold."""
    text, names = _field_names(re.sub(r"\"[^\"]*\"|'[^']*'", "", expr))  # no digits of field names or strings
    params = params or {}
    for m in re.finditer(rf"\b_f\d+\b|{_NUMBER}", text):
        word = m.group(0)
        if word.lstrip("-").startswith("_f"):
            v = params.get(names[word.lstrip("-")])
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
            continue
        return float(word)
    return None


def value_of(expr: str, fields: Mapping[str, Any], skip: Iterable[str] = ()) -> float:
    """The first numeric field the condition reads (not a param in ``skip``), reported as the alert's value."""
    skip = set(skip)
    for m in _FIELD.finditer(re.sub(r"\"[^\"]*\"|'[^']*'", "", expr)):
        if m.group(0) in skip:
            continue
        v = fields.get(m.group(0))
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return 1.0
