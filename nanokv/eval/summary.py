"""The markdown summary: one table per suite and setting (policies x budget @ length), the
diagnostics, the text sources used, and how long the cases took."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nanokv.eval.aggregate import (
    FULL,
    budget_label,
    length_label,
    levels,
    mean,
    mean_curve,
    ordered,
    select,
)
from nanokv.eval.code import edit_similarity

SETTING_TITLES = {
    "question": "question-aware (the question is compressed with the document)",
    "context": "context-only (the document is compressed, then the question is asked)",
}

Cell = Callable[[list[dict]], str]


def write_summary(out: Path, rows: dict[str, list[dict]]) -> Path:
    """Writes `<out>/summary.md` from every suite's rows and returns its path."""
    parts = ["# nanokv eval\n"]
    if rows.get("niah"):
        parts.append(niah_section(rows["niah"]))
    if rows.get("fidelity"):
        parts.append(fidelity_section(rows["fidelity"]))
    if rows.get("code"):
        parts.append(code_section(rows["code"]))
    parts.append(sources_section(rows))
    path = out / "summary.md"
    path.write_text("\n".join(parts))
    return path


def grid_table(rows: list[dict], cell: Cell) -> str:
    """Policies (rows) x budget @ length (columns); `cell` turns the matching rows into text."""
    columns = [(b, n) for b in levels(rows, "budget") for n in levels(rows, "length", False)]
    if not columns:  # only full rows
        columns = [(1.0, n) for n in levels(rows, "length", False)]
    header = ["policy"] + [f"{budget_label(b)} @{length_label(n)}" for b, n in columns]
    body = []
    for policy in ordered(rows, "policy"):
        cells = [cell(select(rows, policy=policy, budget=b, length=n)) for b, n in columns]
        body.append([f"`{policy}`"] + cells)
    return markdown_table(header, body)


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def _percent(field: str) -> Cell:
    def cell(chosen: list[dict]) -> str:
        value = mean(chosen, field)
        return "—" if value is None else f"{100 * value:.0f}"

    return cell


def _kept_share(chosen: list[dict]) -> str:
    curve = mean_curve(chosen, "needle_kept")
    if curve is None:
        return "—"
    return f"{100 * sum(curve) / len(curve):.0f} (min {100 * min(curve):.0f})"


def niah_section(rows: list[dict]) -> str:
    parts = ["## Needle in a haystack\n"]
    for setting in ordered(rows, "setting"):
        in_setting = select(rows, setting=setting)
        parts.append(f"### {SETTING_TITLES.get(setting, setting)}\n")
        for task in ordered(in_setting, "task"):
            for filler in ordered(in_setting, "filler"):
                chosen = select(in_setting, task=task, filler=filler)
                if not chosen:
                    continue
                cases = len({(r["depth"], r["seed"]) for r in chosen})
                parts.append(
                    f"**{task} needle, {filler} filler** — mean score (% of the asked values "
                    f"found), {cases} cases a cell (depths x seeds):\n"
                )
                parts.append(grid_table(chosen, _percent("score")))
        parts.append(
            "Needle kept after compression — share of the asked value's tokens still held, "
            "mean over layers and kv heads (minimum layer) in %; Quest evicts nothing, it "
            "reads a subset of the pages at each step:\n"
        )
        parts.append(grid_table(in_setting, _kept_share))
    return "\n".join(parts)


def fidelity_section(rows: list[dict]) -> str:
    cases = len(ordered(rows, "case"))
    tokens = ", ".join(str(t) for t in levels(rows, "tokens", False))
    parts = [
        "## Fidelity to the full cache\n",
        f"Teacher-forced over {tokens} continuation tokens of standard-library text "
        f"({cases} cases in all).\n",
        "Top-1 agreement with the full cache (%):\n",
        grid_table(rows, _percent("agreement")),
        "Mean KL(full || policy) per token (nats):\n",
        grid_table(rows, _number("kl", 3)),
        "Cosine similarity of the attention outputs for the first decoded token, mean over "
        "layers (minimum layer):\n",
        grid_table(rows, _cosine),
    ]
    return "\n".join(parts)


def _number(field: str, digits: int) -> Cell:
    def cell(chosen: list[dict]) -> str:
        value = mean(chosen, field)
        return "—" if value is None else f"{value:.{digits}f}"

    return cell


def _cosine(chosen: list[dict]) -> str:
    curve = mean_curve(chosen, "cosine")
    if curve is None:
        return "—"
    return f"{sum(curve) / len(curve):.3f} ({min(curve):.3f})"


def code_section(rows: list[dict]) -> str:
    cases = len(ordered(rows, "case"))
    full = {r["case"]: r["prediction"] for r in rows if r["policy"] == FULL}
    rows = [
        {**r, "vs_full": edit_similarity(r["prediction"], full[r["case"]])}
        if r["case"] in full else r
        for r in rows
    ]  # fmt: skip
    return "\n".join(
        [
            "## Code completion (LCC-like)\n",
            f"Next line of a standard-library file, greedy, {cases} cases a column.\n",
            "Edit similarity to the true line (%):\n",
            grid_table(rows, _percent("similarity")),
            "Exact lines (%):\n",
            grid_table(rows, _percent("exact")),
            "Edit similarity to the full cache's line (%) -- what the cache changed, whatever "
            "the model's skill:\n",
            grid_table(rows, _percent("vs_full")),
        ]
    )


def sources_section(rows: dict[str, list[dict]]) -> str:
    """Where every text came from, and the time the cases took."""
    sources = ordered([{"s": s} for r in rows.get("niah", []) for s in r.get("sources", [])], "s")
    files = ordered(rows.get("fidelity", []) + rows.get("code", []), "file")
    lines = ["## Sources and time\n"]
    if sources:
        lines.append("Haystack filler: " + "; ".join(f"`{s}`" for s in sources) + ".\n")
    if files:
        lines.append("Fidelity and code texts: " + ", ".join(f"`{f}`" for f in files) + ".\n")
    for suite, suite_rows in rows.items():
        if suite_rows:
            seconds = sum(r.get("seconds", 0.0) for r in suite_rows)
            lines.append(f"- {suite}: {len(suite_rows)} rows, {seconds:.0f} s of case time")
    lines.append("\n" + time_table(rows))
    return "\n".join(lines) + "\n"


def time_table(rows: dict[str, list[dict]]) -> str:
    """Mean seconds a case (prefill with its eviction, question, answer) per policy and suite:
    what a policy costs on this machine, next to what it keeps."""
    suites = [suite for suite, suite_rows in rows.items() if suite_rows]
    every = [row for suite in suites for row in rows[suite]]
    body = []
    for policy in ordered(every, "policy"):
        cells = [mean(select(rows[suite], policy=policy), "seconds") for suite in suites]
        body.append([f"`{policy}`"] + ["—" if c is None else f"{c:.2f}" for c in cells])
    return "Mean seconds a case:\n\n" + markdown_table(["policy", *suites], body)
