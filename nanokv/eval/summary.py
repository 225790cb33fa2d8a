"""The markdown summary: one table per suite and setting (policies x budget @ length), the
diagnostics, the text sources used, and how long the cases took.

Every number says how many cases it stands on: NIAH and exact-line cells are hits/cases with a
95% Wilson score interval, continuous cells mean ± standard deviation with n, so a difference of
one case in two is not read as a finding. Two marks are explained under the table that uses them:
`*` a cell whose budget fell under the cache floor for some of its cases (it is not really at
that budget), `†` a column whose policies ran on different cases (not a paired comparison).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from nanokv.eval.aggregate import (
    FULL,
    budget_label,
    case_groups,
    floors,
    is_floored,
    length_label,
    levels,
    mean,
    mean_curve,
    ordered,
    select,
    spread,
    successes,
    wilson_interval,
)
from nanokv.eval.code import edit_similarity

SETTING_TITLES = {
    "question": "question-aware (the question is compressed with the document)",
    "context": "context-only (the document is compressed, then the question is asked)",
}
TEXT_TITLES = {
    "docs": "the reference manual (docs)",
    "code": "long standard-library modules (code)",
}
HITS = "hits/cases [95% Wilson interval, %]"
SPREAD = "mean ± standard deviation over the cases"

Cell = Callable[[list[dict]], str]
Column = tuple[float, int]  # (budget, length)


def write_summary(out: Path, rows: dict[str, list[dict]]) -> Path:
    """Writes `<out>/summary.md` from every suite's rows and returns its path."""
    parts = ["# nanokv eval\n"]
    if rows.get("niah"):
        parts.append(niah_section(rows["niah"]))
    if rows.get("fidelity"):
        parts.append(fidelity_section(rows["fidelity"]))
    if rows.get("code"):
        parts.append(code_section(rows["code"]))
    if rows.get("chat"):
        parts.append(chat_section(rows["chat"]))
    parts.append(sources_section(rows))
    path = out / "summary.md"
    path.write_text("\n".join(parts))
    return path


def columns(rows: list[dict]) -> list[Column]:
    """(budget, length) of every column; budget 1 alone when there are only full rows."""
    budgets = levels(rows, "budget") or [1.0]
    return [(b, n) for b in budgets for n in levels(rows, "length", False)]


def cells(rows: list[dict]) -> dict[tuple[str, Column], list[dict]]:
    """The rows of each (policy, column) cell, policies in grid order."""
    return {
        (policy, (b, n)): select(rows, policy=policy, budget=b, length=n)
        for policy in ordered(rows, "policy")
        for b, n in columns(rows)
    }


def grid_table(rows: list[dict], cell: Cell, show_n: bool = False) -> str:
    """Policies (rows) x budget @ length (columns); `cell` turns the matching rows into text.
    Marks floored cells `*` and unpaired columns `†`, with a note under the table for each;
    `show_n` adds each cell's case count (for tables whose cells differ in it)."""
    chosen = cells(rows)
    policies, cols = ordered(rows, "policy"), columns(rows)
    labels = [f"{budget_label(b)} @{length_label(n)}" for b, n in cols]
    notes = [
        _pairing_note(label, {p: chosen[p, c] for p in policies})
        for label, c in zip(labels, cols, strict=True)
    ]
    marked = [label + (" †" if note else "") for label, note in zip(labels, notes, strict=True)]
    header = ["policy", *marked]
    body = [[f"`{p}`"] + [_text(cell, chosen[p, c], show_n) for c in cols] for p in policies]
    notes.append(_floor_note(rows))
    return markdown_table(header, body) + "".join(f"\n{note}\n" for note in notes if note)


def _text(cell: Cell, chosen: list[dict], show_n: bool) -> str:
    """A cell's text, with its case count when asked and `*` when it is floored."""
    text = cell(chosen)
    if text == "—":
        return text
    if show_n:
        text += f" (n={len(ordered(chosen, 'case'))})"
    return text + ("*" if is_floored(chosen) else "")


def _pairing_note(label: str, by_policy: dict[str, list[dict]]) -> str | None:
    """A `†` note when the column's policies ran on different sets of cases, else None."""
    groups = case_groups(by_policy)
    if len(groups) <= 1:
        return None
    shared = frozenset.intersection(*groups)
    runs = "; ".join(
        f"{', '.join(f'`{p}`' for p in policies)} on {len(cases)}"
        for cases, policies in groups.items()
    )
    return (
        f"† {label}: the policies ran on different cases ({runs}; {len(shared)} shared by "
        "all): not a paired comparison, compare with care."
    )


def _floor_note(rows: list[dict]) -> str | None:
    """The `*` note when any row's budget fell under the cache floor, else None."""
    if not is_floored(rows):
        return None
    sizes = " / ".join(str(size) for size in floors(rows)) or "?"
    return (
        f"\\* the budget fell under the cache floor of {sizes} tokens for these cases; rerun "
        "with `--min-cache 0` (into another `--out`) for the exact budget."
    )


def markdown_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def cell_sizes(rows: list[dict]) -> list[int]:
    """The number of cases in each non-empty cell of the rows' table."""
    return [len(ordered(chosen, "case")) for chosen in cells(rows).values() if chosen]


def cases_phrase(rows: list[dict], noun: str, dims: tuple[str, ...]) -> str:
    """E.g. "10 cases a cell: 5 depths (0, 0.25, 0.5, 0.75, 1) x 2 seeds (0, 1)" (`noun`
    singular: "case", "window"; `dims` the fields the cases of a cell differ in)."""
    sizes = cell_sizes(rows) or [0]
    count = f"{min(sizes)}" if min(sizes) == max(sizes) else f"{min(sizes)} to {max(sizes)}"
    parts = []
    for dim in dims:
        values = levels(rows, dim, False)
        parts.append(f"{_counted(len(values), dim)} ({', '.join(f'{v:g}' for v in values)})")
    return f"{_counted(max(sizes), noun, count)} a cell: " + " x ".join(parts)


def _counted(number: int, noun: str, shown: str | None = None) -> str:
    """`1 seed`, `2 seeds` (`shown` replaces the number's text, e.g. a range)."""
    return f"{number if shown is None else shown} {noun}{'' if number == 1 else 's'}"


def uniform(rows: list[dict]) -> bool:
    """Whether every non-empty cell of the rows' table holds as many cases."""
    return len(set(cell_sizes(rows))) <= 1


def hits(field: str) -> Cell:
    """`9/10 [60, 98]`: cases where the boolean `field` holds, and the 95% Wilson interval (%)."""

    def cell(chosen: list[dict]) -> str:
        hit, total = successes(chosen, field)
        if total == 0:
            return "—"
        low, high = wilson_interval(hit, total)
        return f"{hit}/{total} [{100 * low:.0f}, {100 * high:.0f}]"

    return cell


def spread_cell(field: str, scale: float = 1.0, digits: int = 0) -> Cell:
    """`88 ± 6`: the mean of `field` (times `scale`) and its standard deviation over cases."""

    def cell(chosen: list[dict]) -> str:
        found = spread(chosen, field)
        if found is None:
            return "—"
        text = f"{scale * found.mean:.{digits}f}"
        return text if found.sd is None else f"{text} ± {scale * found.sd:.{digits}f}"

    return cell


def kept_share(field: str) -> Cell:
    """`88 (min 40)`: the per-layer share in `field` (e.g. a needle's tokens held), mean over
    the cases and layers, and its lowest layer, in %."""

    def cell(chosen: list[dict]) -> str:
        curve = mean_curve(chosen, field)
        if curve is None:
            return "—"
        return f"{100 * sum(curve) / len(curve):.0f} (min {100 * min(curve):.0f})"

    return cell


def niah_section(rows: list[dict]) -> str:
    parts = [
        "## Needle in a haystack\n",
        f"Cells: {HITS}; a hit is an answer with every asked value. Within a column every "
        "policy ran the same cases (paired) unless a † note says otherwise.\n",
    ]
    for setting in ordered(rows, "setting"):
        in_setting = select(rows, setting=setting)
        parts.append(f"### {SETTING_TITLES.get(setting, setting)}\n")
        for task in ordered(in_setting, "task"):
            for filler in ordered(in_setting, "filler"):
                for needles, chosen in _by_needles(select(in_setting, task=task, filler=filler)):
                    parts += niah_tables(chosen, task, filler, needles)
        parts.append(
            "Needle kept after compression — share of the asked value's tokens still held, "
            "mean over layers and kv heads (minimum layer) in %; Quest evicts nothing, it "
            "reads a subset of the pages at each step:\n"
        )
        parts.append(grid_table(in_setting, kept_share("needle_kept")))
    return "\n".join(parts)


def _by_needles(rows: list[dict]) -> list[tuple[int, list[dict]]]:
    """(needles a document, its rows) for each count present, one needle first (rows without
    the field predate `--needles`: one needle)."""
    counts = sorted({row.get("needles", 1) for row in rows})
    return [(k, [row for row in rows if row.get("needles", 1) == k]) for k in counts]


def niah_tables(rows: list[dict], task: str, filler: str, needles: int = 1) -> list[str]:
    """The hits table of one task and filler (and, for multivalue, the mean share found);
    `needles` > 1: documents of that many needles, each case one of their questions."""
    phrase = cases_phrase(rows, "case", ("depth", "seed"))
    title = f"{task} needle"
    if needles > 1:
        documents = _counted(len(ordered(rows, "document")), "document")
        title = (
            f"{needles} single needles a document, each asked in its own question "
            f"({documents}; context-only compresses a document once for all its questions)"
        )
    parts = [f"**{title}, {filler} filler** — {HITS}, {phrase}:\n"]
    parts.append(grid_table(rows, hits("correct")))
    if task == "multivalue":
        parts.append("Share of the asked values found (%, mean ± standard deviation):\n")
        parts.append(grid_table(rows, spread_cell("score", 100)))
    return parts


def fidelity_section(rows: list[dict]) -> str:
    tokens = ", ".join(str(t) for t in levels(rows, "tokens", False))
    parts = [
        "## Fidelity to the full cache\n",
        f"Teacher-forced over {tokens} continuation tokens of standard-library text; a case is "
        f"a window of the text. Cells: {SPREAD}.\n",
    ]
    for text in ordered(rows, "text"):
        chosen = select(rows, text=text)
        show_n = not uniform(chosen)
        parts += [
            f"### {TEXT_TITLES.get(text, text)}\n",
            f"{cases_phrase(chosen, 'window', ('seed',))}.\n",
            "Top-1 agreement with the full cache (%):\n",
            grid_table(chosen, spread_cell("agreement", 100), show_n),
            "Mean KL(full || policy) per token (nats):\n",
            grid_table(chosen, spread_cell("kl", digits=3), show_n),
            "Cosine similarity of the attention outputs for the first decoded token, mean over "
            "layers (minimum layer):\n",
            grid_table(chosen, _cosine),
        ]
    return "\n".join(parts)


def _cosine(chosen: list[dict]) -> str:
    curve = mean_curve(chosen, "cosine")
    if curve is None:
        return "—"
    return f"{sum(curve) / len(curve):.3f} ({min(curve):.3f})"


def code_section(rows: list[dict]) -> str:
    full = {r["case"]: r["prediction"] for r in rows if r["policy"] == FULL}
    rows = [
        {**r, "vs_full": edit_similarity(r["prediction"], full[r["case"]])}
        if r["case"] in full else r
        for r in rows
    ]  # fmt: skip
    show_n = not uniform(rows)
    return "\n".join(
        [
            "## Code completion (LCC-like)\n",
            "Next line of a standard-library file, greedy; "
            f"{cases_phrase(rows, 'case', ('seed',))}. Cells: {SPREAD}.\n",
            "Edit similarity to the true line (%):\n",
            grid_table(rows, spread_cell("similarity", 100), show_n),
            f"Exact lines ({HITS}):\n",
            grid_table(rows, hits("exact")),
            "Edit similarity to the full cache's line (%) -- what the cache changed, whatever "
            "the model's skill:\n",
            grid_table(rows, spread_cell("vs_full", 100), show_n),
        ]
    )


CHAT_FACTS = {
    "first": "A fact (a name's 7-digit code) stated in turn 1",
    "inside": "A fact (a name's 7-digit code) stated in one sentence inside the passage of "
    "turn 2, 3 or 4 (turn 1 a greeting)",
}


def chat_section(rows: list[dict]) -> str:
    """Recall across a conversation, one part for each place of the fact (rows written before
    `fact` existed have it first)."""
    places = ordered([{"fact": r.get("fact", "first")} for r in rows], "fact")
    parts = [
        _chat_part([r for r in rows if r.get("fact", "first") == place], place, len(places) > 1)
        for place in places
    ]
    return "\n".join(parts)


def _chat_part(rows: list[dict], place: str, titled: bool) -> str:
    """Hits of every policy, then the same among the conversations the full cache recalled
    (paired with it), then what was held of the fact."""
    recalled = {r["case"] for r in rows if r["policy"] == FULL and r.get("correct")}
    references = len({r["case"] for r in rows if r["policy"] == FULL})
    paired = [r for r in rows if r["case"] in recalled]
    title = f" -- fact {place}" if titled else ""
    parts = [
        f"## Recall across a conversation (chat){title}\n",
        f"{CHAT_FACTS[place]}, eight filler turns the model answers "
        "(a task on a passage of prose each), the fact asked in turn 10; after every answer "
        "the arena is compressed back to the budget of the tokens seen with the query-agnostic "
        "scorer (`Conversation`, what `nanokv chat` runs). Length: the ten user messages' "
        f"tokens. {cases_phrase(rows, 'conversation', ('seed',))}. Cells: {HITS}; a hit is a "
        "last answer that holds the code.\n",
        grid_table(rows, hits("correct")),
        f"Among the conversations where the full cache recalled the fact ({len(recalled)} of "
        f"{references}), paired with it: {HITS}.\n",
    ]
    if paired:
        parts.append(grid_table(paired, hits("correct")))
    parts += [
        "Fact held when asked — share of the code's tokens in the arena just before turn 10, "
        "mean over layers and kv heads (minimum layer) in %:\n",
        grid_table(rows, kept_share("fact_kept")),
    ]
    return "\n".join(parts)


def sources_section(rows: dict[str, list[dict]]) -> str:
    """Where every text came from, and the time the cases took."""
    files = ordered(rows.get("fidelity", []) + rows.get("code", []), "file")
    lines = ["## Sources and time\n"]
    for suite, what in (("niah", "Haystack filler"), ("chat", "Chat passages")):
        sources = ordered(
            [{"s": s} for r in rows.get(suite, []) for s in r.get("sources", [])], "s"
        )
        if sources:
            lines.append(f"{what}: " + "; ".join(f"`{s}`" for s in sources) + ".\n")
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
