"""bench/serve.py end to end on a tiny model through the real server: every cell's line, the
bytes line and the summary (a smoke test of what is measured; no speed is asserted)."""

from __future__ import annotations

import json

from bench_scripts import load_bench


def _bench():
    return load_bench("serve")


def test_serve_bench_measures_every_cell_through_the_server(tiny_llama_dir, tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "serve.jsonl"
    argv = [
        "--model", str(tiny_llama_dir), "--dtype", "float32", "--cells", "full", "snapkv@0.1",
        "--prompt-tokens", "120", "--max-tokens", "20", "--requests", "6", "--conversations", "1",
        "--bytes-tokens", "200", "--min-cache", "0", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    full, snapkv, size, summary = lines
    for row in (full, snapkv):
        assert row["output_tokens"] == 6 * 20  # ignore_eos: every request decodes max_tokens
        assert 1 <= row["peak_admitted"] <= 6 and row["ttft_p50_ms"] > 0
        assert 0 < row["peak_pool_use"] <= 1
    assert full["peak_admitted"] == full["pool_holds"] == 1  # the pool holds one full request
    assert snapkv["pool_holds"] > 1
    assert snapkv["peak_admitted"] > full["peak_admitted"]
    assert 0 < size["arena_vs_full"]["snapkv@0.1"] < 1
    ratios = summary["snapkv@0.1"]
    assert ratios["admitted_vs_full"] == round(snapkv["peak_admitted"] / full["peak_admitted"], 2)
    assert len(summary["targets"]) == 2
