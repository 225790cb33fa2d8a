"""Grouping result rows for tables and plots, and the statistics a cell shows. A `full` row
(budget 1) stands for every budget: it is the reference each budget's column is read against.

A cell's rows are its cases (one row a case). Pass/fail fields (NIAH's `correct`, code's
`exact`) are counted as hits/cases with a Wilson score interval, which stays inside [0, 1] and
is honest at 0/10 and 10/10 where the normal approximation collapses to a point; continuous
fields (KL, agreement, similarity) as mean, standard deviation and n.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import sqrt
from statistics import fmean, stdev

FULL = "full"


def ordered(rows: list[dict], field: str) -> list:
    """Distinct values of `field`, in order of first appearance (policies: the grid's order)."""
    return list(dict.fromkeys(row[field] for row in rows if field in row))


def levels(rows: list[dict], field: str, skip_full: bool = True) -> list:
    """Distinct values of `field`, sorted (budgets, lengths, depths); full rows' budget left out."""
    return sorted(
        {row[field] for row in rows if field in row and not (skip_full and row["policy"] == FULL)}
    )


def select(rows: list[dict], **match: object) -> list[dict]:
    """Rows whose fields equal `match`; a full row matches any budget."""
    chosen = []
    for row in rows:
        if all(
            row.get(key) == value or (key == "budget" and row["policy"] == FULL)
            for key, value in match.items()
        ):
            chosen.append(row)
    return chosen


def mean(rows: list[dict], field: str) -> float | None:
    values = [float(row[field]) for row in rows if row.get(field) is not None]
    return fmean(values) if values else None


def mean_curve(rows: list[dict], field: str) -> list[float] | None:
    """Element-wise mean of a per-layer list field (needle kept share, cosine)."""
    curves = [row[field] for row in rows if row.get(field)]
    if not curves:
        return None
    return [fmean(values) for values in zip(*curves, strict=True)]


def wilson_interval(hits: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion `hits / total` (z = 1.96: 95%), as (low, high)
    in [0, 1]: 9/10 -> (0.596, 0.982), 0/10 -> (0, 0.278), 10/10 -> (0.722, 1)."""
    if total <= 0 or not 0 <= hits <= total:
        raise ValueError(f"need 0 <= hits <= total and total > 0, got {hits}/{total}")
    share, z2 = hits / total, z * z
    centre = (share + z2 / (2 * total)) / (1 + z2 / total)
    half = z * sqrt(share * (1 - share) / total + z2 / (4 * total * total)) / (1 + z2 / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def successes(rows: list[dict], field: str) -> tuple[int, int]:
    """(rows whose boolean `field` is true, rows that have the field): hits and cases."""
    values = [bool(row[field]) for row in rows if row.get(field) is not None]
    return sum(values), len(values)


@dataclass(frozen=True)
class Spread:
    """A continuous field over a cell's cases: mean, sample standard deviation (None for one
    case) and the number of cases."""

    mean: float
    sd: float | None
    n: int


def spread(rows: list[dict], field: str) -> Spread | None:
    """Mean, standard deviation and n of `field` over `rows` (None when no row has it)."""
    values = [float(row[field]) for row in rows if row.get(field) is not None]
    if not values:
        return None
    return Spread(fmean(values), stdev(values) if len(values) > 1 else None, len(values))


def is_floored(rows: list[dict]) -> bool:
    """Whether any row's budget fell under the cache floor (rows without the field predate the
    floor: their budgets were exact)."""
    return any(row.get("floored", False) for row in rows)


def floors(rows: list[dict]) -> list[int]:
    """The cache floors (tokens) of the floored rows, sorted."""
    return sorted({row["min_cache"] for row in rows if row.get("floored") and "min_cache" in row})


def case_groups(by_policy: dict[str, list[dict]]) -> dict[frozenset, list[str]]:
    """Policies grouped by the set of cases their rows hold (policies without rows left out):
    one group means the policies are compared on the same cases (paired)."""
    groups: dict[frozenset, list[str]] = {}
    for policy, rows in by_policy.items():
        if rows:
            groups.setdefault(frozenset(row["case"] for row in rows), []).append(policy)
    return groups


def budget_label(budget: float) -> str:
    return f"{budget * 100:g}%" if budget <= 1 else f"{budget:g} tok"


def length_label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)
