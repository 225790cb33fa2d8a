"""`nanokv eval` end to end on a tiny random model: JSONL, summary.md and PNGs; resuming; bad
input is one line and exit status 2, with nothing written; the presets' cases a cell and the
cache floor flag."""

from __future__ import annotations

import argparse
import json
import sys

import pytest
from test_eval_fixtures import long_tiny_dir_fixture  # noqa: F401

from nanokv.cli import main
from nanokv.eval.cli import add_eval_parser, grids
from nanokv.eval.grid import FULL, QUICK

GRID = [
    "--quick", "--lengths", "700", "--depths", "0.5", "--seeds", "0", "--budgets", "0.2",
    "--tokens", "8", "--texts", "docs", "code",
    "--policies", "full", "snapkv", "needle-oracle", "quest:oracle",
]  # fmt: skip


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tiny_end_to_end_writes_results_summary_and_plots(long_tiny_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "eval"
    args = ["eval", "all", "--model", str(long_tiny_dir), "--out", str(out), *GRID]
    assert main(args) == 0
    niah, fidelity, code = (_rows(out / f"{s}.jsonl") for s in ("niah", "fidelity", "code"))
    assert len(niah) == 2 * 4  # question + context x (full + 3 policies at one budget)
    assert len(fidelity) == 2 * 3 and len(code) == 3  # needle-oracle only runs on niah
    assert len({row["id"] for row in niah + fidelity + code}) == len(niah + fidelity + code)
    full = [r for r in fidelity if r["policy"] == "full"]
    assert all(r["agreement"] == 1.0 and r["kl"] == 0.0 for r in full)
    oracle = [r for r in niah if r["policy"] == "needle-oracle"]
    assert all(min(r["needle_kept"]) == 1.0 for r in oracle)
    summary = (out / "summary.md").read_text()
    for heading in ("Needle in a haystack", "Fidelity", "Code completion", "Sources"):
        assert heading in summary
    assert "stdlib/" in summary  # the text sources are listed
    assert "| `full` | 1/1 [21, 100] |" in summary or "| `full` | 0/1 [0, 79] |" in summary
    assert "1 case a cell: 1 depth (0.5) x 1 seed (0)" in summary
    for name in (
        "niah_heatmap_question_b0.2.png", "niah_budget_context.png",
        "niah_needle_kept_question_b0.2.png", "fidelity_cosine_b0.2.png",
        "fidelity_budget.png", "code_budget.png",
    ):  # fmt: skip
        assert (out / name).read_bytes().startswith(b"\x89PNG"), name
    assert "[niah]" in capsys.readouterr().err  # the progress line

    assert main(args) == 0  # resumed: every case is skipped, nothing is appended
    assert len(_rows(out / "niah.jsonl")) == len(niah)
    assert "0 run, 8 resumed" in capsys.readouterr().err


def test_an_interrupted_run_resumes_where_it_stopped(long_tiny_dir, tmp_path):
    out = tmp_path / "eval"
    args = ["eval", "code", "--model", str(long_tiny_dir), "--out", str(out), "--no-plots"]
    args += ["--lengths", "300", "--seeds", "0", "1", "--budgets", "0.2", "--policies", "full"]
    assert main(args) == 0
    path = out / "code.jsonl"
    first, second = path.read_text().splitlines()
    path.write_text(first + "\n" + second[: len(second) // 2])  # a crash mid-line
    assert main(args) == 0
    rows = _rows_skipping_partial(path)
    assert [r["id"] for r in rows] == [json.loads(first)["id"], json.loads(second)["id"]]
    assert rows[1] == json.loads(second) | {"seconds": rows[1]["seconds"]}


def _rows_skipping_partial(path):
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--budgets", "0"], "budget must be"),
        (["--policies", "bogus"], "unknown policy"),
        (["--policies", "snapkv:pool=4"], "pool must be"),
        (["--depths", "1.5"], "depth must be in"),
        (["--tasks", "triple"], "unknown task"),
        (["--lengths", "9000"], "context"),
        (["--lengths", "10"], "too short"),
        (["--min-cache", "-1"], "--min-cache must be at least 0"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(long_tiny_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "eval"
    status = main(["eval", "niah", "--model", str(long_tiny_dir), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2
    assert err.startswith("nanokv: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_needle_oracle_outside_niah_is_refused(long_tiny_dir, tmp_path, capsys):
    args = ["eval", "fidelity", "--model", str(long_tiny_dir), "--out", str(tmp_path / "o")]
    assert main([*args, "--policies", "needle-oracle"]) == 2
    assert "needle-oracle" in capsys.readouterr().err


def test_results_of_another_model_are_not_mixed_in(long_tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"model": "some-other-model"}))
    args = ["eval", "code", "--model", str(long_tiny_dir), "--out", str(out), "--no-plots"]
    assert main([*args, "--lengths", "300", "--seeds", "0", "--policies", "full"]) == 2
    assert "choose another --out" in capsys.readouterr().err


def test_a_case_reruns_from_its_id(long_tiny_dir, tmp_path):
    case = "niah/multikey/neutral/L700/d0.3/s5"
    out = tmp_path / "eval"
    args = ["eval", "all", "--model", str(long_tiny_dir), "--out", str(out), "--no-plots"]
    args += ["--cases", case, "--policies", "full", "snapkv", "--budgets", "0.2"]
    assert main(args) == 0
    rows = _rows(out / "niah.jsonl")
    assert {row["case"] for row in rows} == {case} and len(rows) == 2 * 2
    assert not (out / "fidelity.jsonl").exists()
    assert main([*args[:-7], "--cases", "niah/single/prose"]) == 2  # a malformed id


def test_missing_matplotlib_is_one_line_before_any_work(
    long_tiny_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = tmp_path / "eval"
    args = ["eval", "code", "--quick", "--lengths", "300", "--model", str(long_tiny_dir)]
    status = main([*args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "matplotlib" in err and "\n" not in err
    assert not out.exists()


def _grids(*argv: str):
    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers())
    return grids(parser.parse_args(["eval", *argv]))


def test_full_presets_hold_ten_cases_a_niah_cell_and_quick_stays_small():
    niah, fidelity, code = FULL["niah"], FULL["fidelity"], FULL["code"]
    assert len(niah.depths) * len(niah.seeds) >= 10  # a cell: one task, filler, setting
    assert len(fidelity.seeds) >= 8 and len(code.seeds) >= 10
    quick = QUICK["niah"]  # the under-10-minutes grid on two cores: as measured
    assert len(quick.depths) * len(quick.seeds) * len(quick.lengths) == 4
    assert len(QUICK["fidelity"].seeds) == 1 and len(QUICK["code"].seeds) == 2


def test_the_cache_floor_defaults_to_128_and_the_flag_sets_every_suite():
    assert {g.min_cache for g in _grids("all", "--quick").values()} == {128}
    chosen = _grids("all", "--min-cache", "0")
    assert set(chosen) == {"niah", "fidelity", "code"}
    assert {g.min_cache for g in chosen.values()} == {0}


def test_results_with_another_cache_floor_are_not_mixed_in(long_tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "meta.json").write_text(json.dumps({"min_cache": 0}))
    args = ["eval", "code", "--model", str(long_tiny_dir), "--out", str(out), "--no-plots"]
    assert main([*args, "--lengths", "300", "--seeds", "0", "--policies", "full"]) == 2
    err = capsys.readouterr().err
    assert "min_cache 0, not 128" in err and "choose another --out" in err


def test_results_of_another_dtype_are_not_mixed_in(long_tiny_dir, tmp_path, capsys):
    """The meta names the model's and the KV cache's dtypes; a run with a bf16 cache does not
    resume into an fp32 directory."""
    out = tmp_path / "eval"
    args = ["eval", "code", "--model", str(long_tiny_dir), "--out", str(out), "--no-plots"]
    grid = ["--lengths", "300", "--seeds", "0", "--policies", "full", "--tokens", "4"]
    assert main([*args, *grid]) == 0
    assert json.loads((out / "meta.json").read_text())["dtype"] == "float32"
    assert main([*args, *grid, "--kv-dtype", "bfloat16"]) == 2
    err = capsys.readouterr().err
    assert "dtype 'float32', not 'float32+kv-bfloat16'" in err and "choose another --out" in err
