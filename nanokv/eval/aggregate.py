"""Grouping result rows for tables and plots. A `full` row (budget 1) stands for every budget:
it is the reference each budget's column is read against."""

from __future__ import annotations

from statistics import fmean

FULL = "full"


def ordered(rows: list[dict], field: str) -> list:
    """Distinct values of `field`, in order of first appearance (policies: the grid's order)."""
    return list(dict.fromkeys(row[field] for row in rows if field in row))


def levels(rows: list[dict], field: str, skip_full: bool = True) -> list:
    """Distinct values of `field`, sorted (budgets, lengths, depths); full rows' budget left out."""
    return sorted({row[field] for row in rows if not (skip_full and row["policy"] == FULL)})


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


def budget_label(budget: float) -> str:
    return f"{budget * 100:g}%" if budget <= 1 else f"{budget:g} tok"


def length_label(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)
