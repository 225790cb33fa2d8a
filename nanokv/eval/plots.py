"""PNG plots of the results (matplotlib, the `bench` extra, imported only here):

- niah_heatmap_<setting>_b<budget>.png: hits/cases (every asked value found) in each depth x
  length cell, coloured by the hit rate, one panel per policy (`*`: under the cache floor);
- niah_budget_<setting>.png: mean score vs budget, one curve per policy;
- niah_needle_kept_<setting>_b<budget>.png: share of the needle's tokens held, per layer;
- fidelity_cosine_b<budget>.png: attention-output cosine per layer for the first decoded token;
- fidelity_budget.png: top-1 agreement and KL vs budget;
- code_budget.png: edit similarity vs budget.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from nanokv.eval.aggregate import (
    FULL,
    budget_label,
    is_floored,
    length_label,
    levels,
    mean,
    mean_curve,
    ordered,
    select,
    successes,
)


def pyplot():
    """matplotlib.pyplot on the file-only backend, or one clear error line."""
    try:
        import matplotlib
    except ImportError:
        raise ValueError(
            "plots need matplotlib: pip install 'nanokv[bench]' (or pass --no-plots)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(out: Path, rows: dict[str, list[dict]]) -> list[Path]:
    """Every plot the rows allow; returns the files written."""
    plt = pyplot()
    niah, fidelity, code = rows.get("niah", []), rows.get("fidelity", []), rows.get("code", [])
    policies = ordered(niah + fidelity + code, "policy")
    palette = plt.get_cmap("tab10" if len(policies) <= 10 else "tab20")
    colors = {policy: palette(i % palette.N) for i, policy in enumerate(policies)}  # every plot
    written = []
    for setting in ordered(niah, "setting"):
        rows_in = select(niah, setting=setting)
        for budget in levels(rows_in, "budget"):
            written.append(_heatmaps(plt, out, rows_in, setting, budget))
            title = f"needle tokens kept per layer, {setting}, budget {budget_label(budget)}"
            written.append(_layer_curves(
                plt, colors, out / f"niah_needle_kept_{setting}_b{budget:g}.png",
                select(rows_in, budget=budget), "needle_kept", title, "share of the value held",
            ))  # fmt: skip
        written.append(_budget_curves(
            plt, colors, out / f"niah_budget_{setting}.png", [(rows_in, "score", "mean score")],
            f"NIAH accuracy vs budget, {setting}",
        ))  # fmt: skip
    for budget in levels(fidelity, "budget"):
        title = f"attention-output cosine vs full cache, budget {budget_label(budget)}"
        written.append(_layer_curves(
            plt, colors, out / f"fidelity_cosine_b{budget:g}.png",
            select(fidelity, budget=budget), "cosine", title, "cosine (first decoded token)",
        ))  # fmt: skip
    if fidelity:
        panels = [(fidelity, "agreement", "top-1 agreement"), (fidelity, "kl", "KL(full||policy)")]
        title = "fidelity to the full cache vs budget"
        written.append(_budget_curves(plt, colors, out / "fidelity_budget.png", panels, title))
    if code:
        panels = [(code, "similarity", "edit similarity")]
        title = "code completion vs budget"
        written.append(_budget_curves(plt, colors, out / "code_budget.png", panels, title))
    return [path for path in written if path is not None]


def _heatmaps(plt, out: Path, rows: list[dict], setting: str, budget: float) -> Path:
    """One depth x length panel per policy at `budget` (full shown at its own budget 1): each
    cell annotated with its hits/cases, so one case in two does not pass for a rate."""
    policies = ordered(rows, "policy")
    depths, lengths = levels(rows, "depth", False), levels(rows, "length", False)
    cols = min(4, len(policies))
    lines = math.ceil(len(policies) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(3.3 * cols, 2.8 * lines), squeeze=False)
    for ax, policy in zip(axes.flat, policies, strict=False):
        cells = [
            [select(rows, policy=policy, budget=budget, depth=d, length=n) for n in lengths]
            for d in depths
        ]
        rates = [[_hit_rate(chosen) for chosen in line] for line in cells]
        ax.imshow(rates, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, line in enumerate(cells):
            for j, chosen in enumerate(line):
                ax.text(j, i, _count_label(chosen), ha="center", va="center", fontsize=8)
        ax.set_title("\n".join(textwrap.wrap(policy.replace(",", ", "), 30)), fontsize=8)
        ax.set_xticks(range(len(lengths)), [length_label(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length")
        ax.set_ylabel("needle depth")
    for ax in list(axes.flat)[len(policies) :]:
        ax.axis("off")
    floor = ", * under the cache floor" if is_floored(select(rows, budget=budget)) else ""
    fig.suptitle(f"NIAH hits/cases, {setting}, budget {budget_label(budget)}{floor}")
    return _save(plt, fig, out / f"niah_heatmap_{setting}_b{budget:g}.png")


def _hit_rate(rows: list[dict]) -> float:
    """Share of the rows answered in full (NaN, drawn blank, for no rows)."""
    hits, total = successes(rows, "correct")
    return hits / total if total else math.nan


def _count_label(rows: list[dict]) -> str:
    """`9/10`, with `*` when a case fell under the cache floor; empty for no rows."""
    hits, total = successes(rows, "correct")
    if not total:
        return ""
    return f"{hits}/{total}" + ("*" if is_floored(rows) else "")


def _layer_curves(
    plt, colors: dict[str, tuple], path: Path, rows: list[dict], field: str, title: str, ylabel: str
):
    """One curve per policy of a per-layer list field, averaged over the rows."""
    fig, ax = plt.subplots(figsize=(10, 4.5))
    drawn = False
    for policy in ordered(rows, "policy"):
        curve = mean_curve(select(rows, policy=policy), field)
        if curve is not None:
            ax.plot(range(len(curve)), curve, marker=".", label=policy, color=colors.get(policy))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    _legend(ax)
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def _budget_curves(
    plt, colors: dict[str, tuple], path: Path, panels: list[tuple[list[dict], str, str]], title: str
):
    """Per panel: mean of a field vs budget, one curve per policy, full as a dashed line."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels) + 3, 4.5), squeeze=False)
    for ax, (rows, field, ylabel) in zip(axes.flat, panels, strict=True):
        budgets = levels(rows, "budget")
        for policy in ordered(rows, "policy"):
            chosen = select(rows, policy=policy)
            if policy == FULL:
                value = mean(chosen, field)
                if value is not None:
                    ax.axhline(value, color="black", linestyle="--", label=FULL)
                continue
            points = [(b, mean(select(chosen, budget=b), field)) for b in budgets]
            points = [(b, v) for b, v in points if v is not None]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=policy, color=colors.get(policy))
        ax.set_xscale("log")
        ax.set_xticks(budgets, [budget_label(b) for b in budgets])
        ax.minorticks_off()
        ax.set_xlabel("KV budget")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    _legend(axes.flat[-1])  # one legend: the panels share their policies
    fig.suptitle(title)
    return _save(plt, fig, path)


def _legend(ax) -> None:
    """The legend outside the axes, on the right: long policy specs do not hide the curves."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
