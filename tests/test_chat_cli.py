"""`nanokv chat` driven through its stdin: scripted turns, /stats, /reset, /exit; bad turns get
one line and the chat goes on; Ctrl-C stops an answer, not the chat. The answers are checked
against the library form (`Conversation`) of the same conversation."""

from __future__ import annotations

import builtins
import io
import re
import signal
import sys
from pathlib import Path

import pytest
from test_conversation import save_word_model

import nanokv
from nanokv.cli import main
from nanokv.engine import Engine
from nanokv.sampling import SamplingParams

NEW = 6
FLAGS = ["--policy", "snapkv", "--budget", "12", "--min-cache", "0", "--max-new-tokens", str(NEW)]
LONG = "the quick brown fox jumps over the lazy dog " * 30  # longer than the 256-token context


@pytest.fixture(scope="module")
def word_dir(tmp_path_factory) -> Path:
    return save_word_model(tmp_path_factory.mktemp("tiny-words-cli"))


@pytest.fixture(scope="module")
def llm(word_dir):
    return nanokv.LLM(word_dir, policy="snapkv", budget=12.0, min_cache=0)


def _chat(word_dir: Path, script: str, monkeypatch, capsys, *flags: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # not a terminal: no prompt
    code = main(["chat", "--model", str(word_dir), *FLAGS, *flags])
    out, err = capsys.readouterr()
    return code, out, err


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_scripted_chat_with_stats_reset_and_exit(word_dir, llm, monkeypatch, capsys):
    script = (
        "hello world\n/stats\nthe quick brown fox\n/stats\n/reset\nhello world\n/exit\nnot sent\n"
    )
    code, out, err = _chat(word_dir, script, monkeypatch, capsys)
    assert code == 0, err
    conversation = llm.conversation(SamplingParams(max_new_tokens=NEW))
    first = conversation.send("hello world")
    first_stats = conversation.stats()
    second = conversation.send("the quick brown fox")
    second_stats = conversation.stats()
    fresh = llm.conversation(SamplingParams(max_new_tokens=NEW)).send("hello world")
    want = [first.text, first_stats.line(), second.text, second_stats.line(), fresh.text]
    assert out == "\n".join(want) + "\n"
    assert fresh.text == first.text  # /reset: a fresh conversation
    assert _lines(err) == ["nanokv: a new conversation"]
    cfg = llm.config
    seen = len(first.prompt_token_ids) + len(first.token_ids) - 1  # the last one is pending
    numbers = re.search(
        r"turns (\d+), tokens seen (\d+); kept per head: mean ([\d.]+), min (\d+), max (\d+); "
        r"arena .* \(([\d,]+) bytes\) allocated, K/V held .* \(([\d,]+) bytes\) = .* of a full "
        r"cache of the tokens seen \(.* \(([\d,]+) bytes\)\)",
        out.splitlines()[1],
    ).groups()  # fmt: skip
    per_token = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * llm.dtype.itemsize  # K, V
    slots = 12  # between turns each head holds only what it kept (`KVArena.pack_heads`)
    heads = cfg.num_layers * cfg.num_kv_heads
    arena = slots * per_token + heads * (2 * slots + 1) * 4  # + pos, score (a slot), lengths
    assert [float(n.replace(",", "")) for n in numbers] == [
        1, seen, 12.0, 12, 12, arena, 12 * per_token, seen * per_token
    ]  # fmt: skip


def test_bad_turns_get_one_line_and_the_chat_goes_on(word_dir, llm, monkeypatch, capsys):
    script = f"hello world\n\n{LONG}\n   \nthe quick brown fox\n"  # ends at EOF
    code, out, err = _chat(word_dir, script, monkeypatch, capsys)
    assert code == 0, err
    errors = _lines(err)
    assert len(errors) == 3 and all(e.startswith("nanokv: error: ") for e in errors)
    assert "the turn is empty" in errors[0] and "the turn is empty" in errors[2]
    assert "more than the model's 256-token context" in errors[1]
    conversation = llm.conversation(SamplingParams(max_new_tokens=NEW))
    want = [conversation.send("hello world").text, conversation.send("the quick brown fox").text]
    assert out == "\n".join(want) + "\n"


def test_ctrl_c_stops_the_answer_not_the_chat(word_dir, llm, monkeypatch, capsys):
    """A SIGINT during the first answer's second decode step: the answer stops at the next
    piece of text, the chat answers the next turn from the conversation that kept it, and the
    previous SIGINT handler is back."""
    steps = 0
    step = Engine.step

    def interrupting_step(engine, state, tokens, capture=None):
        nonlocal steps
        steps += 1
        if steps == 2:
            signal.raise_signal(signal.SIGINT)
        return step(engine, state, tokens, capture)

    handler = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(Engine, "step", interrupting_step)
    code, out, err = _chat(word_dir, "hello world\nthe quick brown fox\n", monkeypatch, capsys)
    monkeypatch.undo()
    assert code == 0, err
    assert signal.getsignal(signal.SIGINT) is handler
    assert _lines(err) == ["nanokv: answer stopped; the conversation goes on"]
    conversation = llm.conversation(SamplingParams(max_new_tokens=NEW))
    pieces: list[str] = []

    def stop_at_third(text: str) -> None:
        pieces.append(text)
        if len(pieces) == 3:
            raise KeyboardInterrupt

    stopped = conversation.send("hello world", on_text=stop_at_third)
    assert stopped.finish_reason == "interrupted" and len(stopped.token_ids) == 3
    following = conversation.send("the quick brown fox")
    assert out == f"{stopped.text}\n{following.text}\n"


def test_a_terminal_gets_a_prompt(word_dir, monkeypatch, capsys):
    typed, prompts = iter(["hello world", "/exit"]), []

    def fake_input(prompt: str) -> str:
        prompts.append(prompt)
        return next(typed)

    terminal = io.StringIO()
    terminal.isatty = lambda: True
    monkeypatch.setattr(sys, "stdin", terminal)
    monkeypatch.setattr(builtins, "input", fake_input)
    assert main(["chat", "--model", str(word_dir), *FLAGS]) == 0
    out, err = capsys.readouterr()
    assert prompts == ["> ", "> "] and len(_lines(out)) == 1
    assert "/stats, /reset, /exit" in err


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--policy", "snapkv+quest"], "does not run Quest"),
        (["--policy", "snapkv", "--observe", "last"], "compresses with KVzip's probe"),
        (["--policy", "full", "--budget", "0.5"], "needs an eviction policy"),
    ],
)
def test_unusable_options_are_one_line_and_exit_2(word_dir, monkeypatch, capsys, flags, fragment):
    code, out, err = _chat(word_dir, "hello world\n", monkeypatch, capsys, *flags)
    (line,) = _lines(err)
    assert code == 2 and out == "" and line.startswith("nanokv: error: ") and fragment in line


def test_a_chat_on_a_bf16_cache_is_the_library_s_and_holds_half_the_bytes(
    word_dir, monkeypatch, capsys
):
    """--kv-dtype bfloat16: the same turns as `Conversation` on `LLM(kv_dtype="bfloat16")`, and
    /stats counts its K/V at 2 bytes an element."""
    script = "hello world\n/stats\n"
    code, out, err = _chat(word_dir, script, monkeypatch, capsys, "--kv-dtype", "bfloat16")
    assert code == 0, err
    half = nanokv.LLM(word_dir, policy="snapkv", budget=12.0, min_cache=0, kv_dtype="bfloat16")
    conversation = half.conversation(SamplingParams(max_new_tokens=NEW))
    answer = conversation.send("hello world")
    stats = conversation.stats()
    assert out == f"{answer.text}\n{stats.line()}\n"
    cfg = half.config
    assert stats.kv_bytes == 12 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2


@pytest.mark.parametrize("sentences", [None, "0"])
def test_sentences_flag_switches_the_turn_memory(word_dir, monkeypatch, capsys, sentences):
    """laprox: by default a conversation recompresses through its turn memory (every head holds
    the same count), `--sentences 0` through the model-wide per-head cut (counts differ); the
    CLI's turns and /stats are the library's."""
    flags = [
        "--policy",
        "laprox",
        "--budget",
        "0.2",
        *(["--sentences", sentences] * bool(sentences)),
    ]
    script = "hello world\nthe quick brown fox\n/stats\n"
    code, out, err = _chat(word_dir, script, monkeypatch, capsys, *flags)
    assert code == 0, err
    options = {} if sentences is None else {"sentences": float(sentences)}
    same = nanokv.LLM(word_dir, policy="laprox", budget=0.2, min_cache=0, **options)
    conversation = same.conversation(SamplingParams(max_new_tokens=NEW))
    answers = [conversation.send(turn).text for turn in ("hello world", "the quick brown fox")]
    stats = conversation.stats()
    assert out == "\n".join([*answers, stats.line()]) + "\n"
    assert (conversation._memory is None) == (sentences == "0")
    assert (stats.kept_min == stats.kept_max) == (sentences is None)
