"""bench/chat.py on a tiny model: a line a (policy, turn), the compression counted only where the
policy compresses, the ratio to the full cache's turn (no timing is asserted)."""

from __future__ import annotations

import json

from bench_scripts import load_bench


def test_chat_bench_times_every_turn_of_every_policy(tiny_llama_dir, tmp_path, capsys):
    bench = load_bench("chat")
    out = tmp_path / "chat.jsonl"
    argv = [
        "--model", str(tiny_llama_dir), "--policies", "full", "laprox", "snapkv",
        "--budget", "0.3", "--min-cache", "0", "--turns", "2", "--turn-tokens", "4",
        "--max-new-tokens", "4", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines == [json.loads(line) for line in out.read_text().splitlines()]
    assert [(line["bench"], line["policy"]) for line in lines] == [
        (bench_name, policy)
        for policy in ("full", "laprox", "snapkv")
        for bench_name in ("chat", "chat", "chat-summary")
    ]
    turns = {p: [x for x in lines if x["policy"] == p and x["bench"] == "chat"] for p in
             ("full", "laprox", "snapkv")}  # fmt: skip
    seen = [row["tokens_seen"] for row in turns["full"]]
    assert seen[0] < seen[1]  # the tiny model's 256-token context holds two turns
    assert all(row["compress_s"] == 0 and "turn_vs_full" not in row for row in turns["full"])
    for policy in ("laprox", "snapkv"):
        rows = turns[policy]
        assert [row["tokens_seen"] for row in rows] == seen  # the same answers' lengths
        assert all(row["compress_s"] > 0 and row["turn_vs_full"] > 0 for row in rows)
        assert all(row["kept_per_head"] < row["tokens_seen"] for row in rows)
    summary = lines[5]
    assert summary["turns"] == 2 and summary["tokens_seen"] == seen[-1]
    assert 0 < summary["compress_share"] < 1
