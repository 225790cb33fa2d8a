"""The README's own examples on the default model: at `--budget 0.05` a short question keeps its
whole prompt (the cache floor), so the text equals the full cache's, and `--verbose` says why."""

from __future__ import annotations

import pytest

from nanokv.cli import main

pytestmark = pytest.mark.default_model

QUESTION = "Explain what a KV cache is."


def _generate(capsys, *argv: str) -> tuple[str, str]:
    assert main(["generate", "--device", "cpu", *argv]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_quick_start_short_question_is_the_full_cache(default_model_dir, capsys):
    args = ("--max-new-tokens", "64", "--verbose", QUESTION)
    evicted, report = _generate(capsys, "--budget", "0.05", "--policy", "laprox", *args)
    full, _ = _generate(capsys, "--budget", "1.0", *args)
    assert evicted == full and len(evicted.split()) > 20
    assert "floor 128" in report and "nothing evicted" in report


def test_readme_library_example_is_the_full_cache(default_model_dir):
    import nanokv

    prompts = ["The capital of France is", "KV caches are"]
    params = nanokv.SamplingParams(
        max_new_tokens=64, temperature=0.7, top_p=0.9, seed=0, stop=["\n\n"]
    )
    texts = {}
    for budget, policy in ((0.05, "laprox"), (1.0, "full")):
        llm = nanokv.LLM(None, policy=policy, budget=budget, device="cpu")
        raw = [out.text for out in llm.generate(prompts, max_new_tokens=32)]
        texts[policy] = (raw, llm.chat(QUESTION, params)[0].text)
    assert texts["laprox"] == texts["full"]
    assert "Paris" in texts["laprox"][0][0]
