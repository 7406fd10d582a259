"""The table: medians with min-max, ratios, and the issue's targets.

A :class:`Row` holds the raw samples of one operation for mpiengine and
ipyparallel and its floor; :func:`table` renders all rows with the ratios
mpiengine/ipyparallel and mpiengine/floor, the target and whether it is met.
Rows that were not measured still appear, with the reason, so every operation
has a line in every run.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

#: Row key -> targets: ("ipp", r) means mpiengine/ipyparallel <= r, ("floor", r)
#: mpiengine/floor <= r, ("abs", v) the mpiengine median <= v (in the row's base
#: unit: seconds or CPU-seconds), ("row:KEY", r) median <= r x row KEY's median.
TARGETS: Dict[str, List[Tuple[str, float]]] = {
    "exec": [("ipp", 1 / 10)],
    "push_big": [("ipp", 1 / 4), ("floor", 2.0)],
    "pull_big": [("ipp", 1 / 3)],
    "scatter_big": [("ipp", 1 / 3), ("floor", 2.0)],
    "gather_big": [("ipp", 1 / 3), ("floor", 2.0)],
    "scatter_list": [("ipp", 1.0)],
    "gather_list": [("ipp", 1.0)],
    "map_big": [("ipp", 1 / 2)],
    "start": [("ipp", 1 / 4)],
    "idle_cpu": [("abs", 0.05)],
    "first_after_idle": [("abs", 0.020)],
    "scale_32": [("row:scale_4", 4.0)],
}

UNITS = {"ms": 1e3, "s": 1.0, "CPU-s": 1.0}
HEADER = ("operation", "unit", "mpiengine median [min-max]", "ipyparallel median [min-max]",
          "floor", "me/ipp", "me/floor", "target", "met")


@dataclass
class Row:
    key: str
    label: str
    unit: str = "ms"
    me: List[float] = field(default_factory=list)
    ipp: List[float] = field(default_factory=list)
    floor: Optional[float] = None
    me_note: str = ""   # why there are no mpiengine samples
    ipp_note: str = ""  # why there are no ipyparallel samples

    @property
    def me_median(self) -> Optional[float]:
        return _median(self.me)

    @property
    def ipp_median(self) -> Optional[float]:
        return _median(self.ipp)


def _median(xs: Sequence[float]) -> Optional[float]:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[len(xs) // 2]


def _num(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def cell(xs: Sequence[float], unit: str, note: str) -> str:
    if not xs:
        return note or "-"
    k = UNITS[unit]
    return f"{_num(_median(xs) * k)} [{_num(min(xs) * k)}-{_num(max(xs) * k)}]"


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _target_text(key: str, unit: str) -> str:
    parts = []
    for kind, bound in TARGETS.get(key, []):
        if kind == "ipp":
            parts.append(f"<= {_frac(bound)} ipp")
        elif kind == "floor":
            parts.append(f"<= {bound:g}x floor")
        elif kind == "abs":
            parts.append(f"<= {_num(bound * UNITS[unit])} {unit}")
        else:
            parts.append(f"<= {bound:g}x {kind[4:]}")
    return ", ".join(parts) or "-"


def _frac(r: float) -> str:
    return "1x" if r == 1 else f"1/{round(1 / r)}"


def verdicts(rows: List[Row]) -> Dict[str, Optional[bool]]:
    """``{row key: True (met) / False (missed) / None (not measurable)}`` for rows with targets."""
    by_key = {r.key: r for r in rows}
    out: Dict[str, Optional[bool]] = {}
    for row in rows:
        checks = []
        for kind, bound in TARGETS.get(row.key, []):
            if kind == "ipp":
                value = ratio(row.me_median, row.ipp_median)
            elif kind == "floor":
                value = ratio(row.me_median, row.floor)
            elif kind == "abs":
                value = row.me_median
            else:
                ref = by_key.get(kind[4:])
                value = ratio(row.me_median, ref.me_median if ref else None)
            checks.append(None if value is None else value <= bound)
        if checks:
            out[row.key] = None if None in checks else all(checks)
    return out


def table(rows: List[Row]) -> str:
    met = verdicts(rows)
    lines = [HEADER]
    for r in rows:
        k = UNITS[r.unit]
        ri = ratio(r.me_median, r.ipp_median)
        rf = ratio(r.me_median, r.floor)
        verdict = {True: "yes", False: "NO", None: "n/a"}[met[r.key]] if r.key in met else "-"
        lines.append((
            r.label, r.unit, cell(r.me, r.unit, r.me_note), cell(r.ipp, r.unit, r.ipp_note),
            _num(r.floor * k) if r.floor is not None else "-",
            f"{ri:.3g}" if ri is not None else "-", f"{rf:.3g}" if rf is not None else "-",
            _target_text(r.key, r.unit), verdict))
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip())
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def summary(rows: List[Row]) -> str:
    met = verdicts(rows)
    good = [k for k, v in met.items() if v]
    bad = [k for k, v in met.items() if v is False]
    unknown = [k for k, v in met.items() if v is None]
    text = f"targets met: {len(good)} of {len(met)}"
    if bad:
        text += "; missed: " + ", ".join(bad)
    if unknown:
        text += "; not measurable in this run: " + ", ".join(unknown)
    return text
