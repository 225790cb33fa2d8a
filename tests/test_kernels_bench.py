"""The kernel microbenchmark runs end to end on a tiny sweep (a smoke test, no timing asserted)."""

import json

from bench_scripts import load_bench


def test_bench_kernels_tiny_sweep_writes_json_and_png(tmp_path, capsys):
    bench = load_bench("attention_kernels")
    tiny = "--contexts 64 --fractions 0.5 --gqa 2 --batch 1 --kv-heads 2 --head-dim 16"
    bench.main([*tiny.split(), "--warmup", "1", "--reps", "1", "--copy-mb", "1"])
    bench.main([*tiny.split(), "--reps", "1", "--copy-mb", "1", "--out", str(tmp_path)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert "copy_gb_s" in lines[0]
    rows = [line for line in lines if "op" in line]
    assert len(rows) == 12
    ops = {row["op"] for row in rows}
    assert ops == {"sdpa_full", "sdpa", "decode", "decode_emit", "quest", "value_norms"}
    assert all(row["ms"] > 0 and row["bytes_read"] > 0 for row in rows)
    saved = json.loads((tmp_path / "kernels.json").read_text())
    assert len(saved["rows"]) == 6 and (tmp_path / "kernels.png").stat().st_size > 0
