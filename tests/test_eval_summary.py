"""summary.md and the heat-maps from hand-made result rows (no model): Wilson intervals,
hits/cases cells, the cache-floor mark, the unpaired-cases note and the spread of continuous
fields."""

from __future__ import annotations

import pytest

from nanokv.eval.aggregate import case_groups, spread, wilson_interval
from nanokv.eval.summary import code_section, fidelity_section, niah_section, write_summary

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def niah_row(policy: str, budget: float, depth: float, seed: int, correct: bool, **extra) -> dict:
    """A NIAH row as suites.py writes it (the fields the summary reads)."""
    case = f"niah/single/prose/L1024/d{depth:g}/s{seed}"
    return {
        "id": f"{case}|question|{policy}|b{budget:g}", "suite": "niah", "case": case,
        "task": "single", "filler": "prose", "length": 1024, "depth": depth, "seed": seed,
        "setting": "question", "policy": policy, "budget": budget, "score": float(correct),
        "correct": correct, "needle_kept": [1.0, 0.5], "seconds": 1.0, **extra,
    }  # fmt: skip


def niah_rows(misses: int = 1, **extra) -> list[dict]:
    """full (all hits) and snapkv at 5% (`misses` of its 10 cases missed): 5 depths x 2 seeds."""
    cases = [(d, s) for d in DEPTHS for s in (0, 1)]
    rows = [niah_row("full", 1.0, d, s, True) for d, s in cases]
    return rows + [
        niah_row("snapkv", 0.05, d, s, i >= misses, **extra) for i, (d, s) in enumerate(cases)
    ]


def cells_of(text: str, policy: str) -> list[str]:
    """The cells of `policy`'s line in the first table of `text` that has one."""
    line = next(line for line in text.splitlines() if line.startswith(f"| `{policy}` |"))
    return [cell.strip() for cell in line.strip("|").split("|")][1:]


@pytest.mark.parametrize(
    "hits, total, low, high",
    [(9, 10, 0.596, 0.982), (0, 10, 0.0, 0.278), (10, 10, 0.722, 1.0), (5, 10, 0.237, 0.763),
     (1, 1, 0.207, 1.0), (45, 50, 0.786, 0.957)],
)  # fmt: skip
def test_wilson_interval_matches_known_values(hits, total, low, high):
    got = wilson_interval(hits, total)
    assert got == pytest.approx((low, high), abs=5e-4)
    assert 0.0 <= got[0] <= hits / total <= got[1] <= 1.0


def test_wilson_interval_is_wider_at_99_percent_and_refuses_impossible_counts():
    low95, high95 = wilson_interval(3, 10)
    low99, high99 = wilson_interval(3, 10, z=2.576)
    assert low99 < low95 and high99 > high95
    for hits, total in ((1, 0), (11, 10), (-1, 10)):
        with pytest.raises(ValueError):
            wilson_interval(hits, total)


def test_niah_cells_are_hits_over_cases_with_the_interval_and_name_their_cases():
    text = niah_section(niah_rows(misses=1))
    assert cells_of(text, "snapkv") == ["9/10 [60, 98]"]
    assert cells_of(text, "full") == ["10/10 [72, 100]"]  # full stands in every budget's column
    assert "| policy | 5% @1k |" in text
    assert "10 cases a cell: 5 depths (0, 0.25, 0.5, 0.75, 1) x 2 seeds (0, 1)" in text
    assert "†" not in text.split("\n\n", 2)[2] and "\\*" not in text  # paired, not floored


def test_a_cell_under_the_cache_floor_is_marked_with_a_note():
    text = niah_section(niah_rows(misses=10, floored=True, min_cache=128))
    assert cells_of(text, "snapkv") == ["0/10 [0, 28]*"]
    assert cells_of(text, "full") == ["10/10 [72, 100]"]
    note = "\\* the budget fell under the cache floor of 128 tokens for these cases"
    assert note in text and "--min-cache 0" in text


def test_rows_without_the_floor_fields_are_not_floored():
    old = niah_rows(misses=0)  # written before the cache floor: no "floored", no "min_cache"
    assert "floored" not in old[-1]
    assert cells_of(niah_section(old), "snapkv") == ["10/10 [72, 100]"]
    new = niah_rows(misses=0, floored=False, min_cache=128)
    mixed = old[:10] + new[10:15] + old[15:]  # old and new rows in one cell
    for rows in (old, new, mixed):
        assert "*" not in cells_of(niah_section(rows), "snapkv")[0]
        assert "cache floor" not in niah_section(rows)
    one = mixed[:-1] + [{**mixed[-1], "floored": True, "min_cache": 64}]
    assert cells_of(niah_section(one), "snapkv") == ["10/10 [72, 100]*"]
    assert "cache floor of 64 tokens" in niah_section(one)


def test_policies_run_on_different_cases_get_a_note_not_a_silent_comparison():
    rows = [row for row in niah_rows() if not (row["policy"] == "snapkv" and row["seed"] == 1)]
    text = niah_section(rows)
    assert "| policy | 5% @1k † |" in text
    assert cells_of(text, "snapkv") == ["4/5 [38, 96]"]
    assert "† 5% @1k: the policies ran on different cases (`full` on 10; `snapkv` on 5; " in text
    assert "5 shared by all)" in text
    groups = case_groups({"full": rows[:10], "snapkv": rows[10:], "h2o": []})
    assert sorted(len(cases) for cases in groups) == [5, 10]  # policies without rows left out


def fidelity_row(policy: str, budget: float, seed: int, agreement: float, kl: float, **extra):
    case = f"fidelity/docs/L2048/N32/s{seed}"
    return {
        "id": f"{case}|{policy}|b{budget:g}", "suite": "fidelity", "case": case, "text": "docs",
        "file": "stdlib/pydoc_data.topics", "length": 2048, "tokens": 32, "seed": seed,
        "policy": policy, "budget": budget, "agreement": agreement, "kl": kl,
        "cosine": [1.0, 0.9], "seconds": 1.0, **extra,
    }  # fmt: skip


def test_fidelity_cells_show_mean_and_standard_deviation_over_windows():
    agreements, kls = (0.75, 0.8125, 0.875, 0.9375), (0.1, 0.2, 0.3, 0.4)
    rows = [fidelity_row("full", 1.0, s, 1.0, 0.0) for s in range(4)]
    pairs = enumerate(zip(agreements, kls, strict=True))
    rows += [fidelity_row("snapkv", 0.1, s, a, k) for s, (a, k) in pairs]
    text = fidelity_section(rows)
    assert spread(rows[4:], "kl").n == 4
    assert spread(rows[4:], "kl").sd == pytest.approx(0.1291, abs=1e-4)
    assert cells_of(text, "snapkv") == ["84 ± 8"]  # agreement, %: the first table
    assert "| `snapkv` | 0.250 ± 0.129 |" in text
    assert "| `full` | 0.000 ± 0.000 |" in text
    assert "4 windows a cell: 4 seeds (0, 1, 2, 3)" in text and "(n=" not in text


def test_fidelity_cells_give_n_when_cells_differ_and_split_texts():
    rows = [fidelity_row("full", 1.0, s, 1.0, 0.0) for s in range(3)]
    rows += [fidelity_row("snapkv", 0.1, s, 0.8, 0.2) for s in range(2)]  # one window short
    rows += [{**fidelity_row("h2o", 0.1, 0, 0.9, 0.1), "text": "code", "case": "fidelity/code"}]
    text = fidelity_section(rows)
    assert "| `snapkv` | 80 ± 0 (n=2) |" in text and "| `full` | 100 ± 0 (n=3) |" in text
    assert "2 to 3 windows a cell" in text and "† 10% @2k" in text
    assert "### the reference manual (docs)" in text
    assert "### long standard-library modules (code)" in text


def code_row(policy: str, budget: float, seed: int, similarity: float, prediction: str):
    case = f"code/L1024/s{seed}"
    return {
        "id": f"{case}|{policy}|b{budget:g}", "suite": "code", "case": case, "length": 1024,
        "seed": seed, "policy": policy, "budget": budget, "file": "stdlib/difflib.py",
        "prediction": prediction, "target": "x = 1", "similarity": similarity,
        "exact": prediction == "x = 1", "seconds": 1.0,
    }  # fmt: skip


def test_code_cells_show_spread_and_exact_hits():
    rows = [code_row("full", 1.0, s, 1.0, "x = 1") for s in range(10)]
    rows += [code_row("snapkv", 0.1, s, 0.5 if s % 2 else 1.0, "x = 1" if s % 2 == 0 else "y")
             for s in range(10)]  # fmt: skip
    text = code_section(rows)
    similarity, exact, vs_full = (t for t in text.split("| policy |")[1:])
    assert cells_of(similarity, "snapkv") == ["75 ± 26"]
    assert cells_of(exact, "snapkv") == ["5/10 [24, 76]"]
    assert cells_of(vs_full, "full") == ["100 ± 0"]
    assert "10 cases a cell: 10 seeds" in text


def test_write_summary_renders_every_section(tmp_path):
    rows = {
        "niah": niah_rows(misses=2, floored=True, min_cache=128),
        "fidelity": [fidelity_row("full", 1.0, 0, 1.0, 0.0), fidelity_row("h2o", 0.1, 0, 0.8, 0.2)],
        "code": [code_row("full", 1.0, 0, 1.0, "x = 1"), code_row("h2o", 0.1, 0, 0.2, "y")],
    }
    text = write_summary(tmp_path, rows).read_text()
    assert "| `snapkv` | 8/10 [49, 94]* |" in text
    assert "| `h2o` | 80 |" in text  # one window: no standard deviation
    assert "| `h2o` | 0/1 [0, 79] |" in text  # exact lines
    assert "Mean seconds a case" in text


def test_heatmap_cells_are_annotated_with_hits_over_cases(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    from nanokv.eval import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda plt, fig, path: figures.append(fig) or path)
    rows = niah_rows(misses=3, floored=True, min_cache=128)
    plots._heatmaps(plots.pyplot(), tmp_path, rows, "question", 0.05)
    (fig,) = figures
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in fig.axes if ax.texts}
    assert texts["full"] == ["2/2"] * 5  # depth x length: 5 depths x 1 length, 2 seeds a cell
    assert texts["snapkv"] == ["0/2*", "1/2*", "2/2*", "2/2*", "2/2*"]
    assert any("cache floor" in title.get_text() for title in fig.texts)  # the suptitle
    plots.pyplot().close(fig)
