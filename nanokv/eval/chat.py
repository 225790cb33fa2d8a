"""Recall across a conversation: a fact stated early, eight filler turns, the fact asked in turn
10 -- generated, no download.

A case is one scripted conversation run through `Conversation`, the path `nanokv chat` takes:
every turn goes into one arena and after every answer the arena is compressed back to the
budget of the tokens seen with the query-agnostic scorer (KVzip's probe for the policies that
score from an observation window), so the fact must survive nine compressions, none of which
knows the question, before it is asked. The model really answers every turn (greedy, a few
dozen tokens), so what is compressed is a real conversation.

- turn 1 states the fact: a name and its 7-digit code, drawn from the case id;
- turns 2-9 each ask for one small task (summarise, give a title, ...) on a passage of prose
  that ships with Python and the installed packages (`corpus.prose_sentences`, from a
  seed-chosen offset, as NIAH's haystacks), a new passage each turn;
- turn 10 asks for the code; a hit is an answer holding it as a whole number.

Where the fact is (`fact`): `first`, as above, a short turn of its own, the turn the
conversation's memory can keep whole (nanokv/turn_memory.py); or `inside`, one sentence ("The
locker code of <name> is <code>.") inside the passage of turn 2, 3 or 4, at the sentence
boundary nearest a quarter, half or three quarters of it (drawn from the id), with a greeting
as turn 1 and a question that does not say where it was: a fact in a turn too long to
keep whole, which only its sentence can carry through the compressions.

A case is fully determined by its id, ``chat/L<tokens>/s<seed>`` (fact first) or
``chat/L<tokens>/s<seed>/inside``: `tokens` is the length of the ten user messages together
(their text, without the chat template; the passages share what the fact, the question and the
instructions leave), the model's answers come on top.
"""

from __future__ import annotations

import random
import re
import time
from dataclasses import dataclass

from nanokv.conversation import Conversation
from nanokv.eval.ask import kept_share
from nanokv.eval.haystack import build_haystack, filler_stream
from nanokv.eval.niah import score
from nanokv.eval.specs import PolicySpec
from nanokv.eval.tokens import counter, token_positions
from nanokv.policies import POLICIES, parse_policy
from nanokv.sampling import SamplingParams
from nanokv.tokenizer import Tokenizer

TURNS = 10
FILLER_TURNS = TURNS - 2
FILLER_ANSWER_TOKENS = 32  # each filler turn's answer: a sentence or two
QUESTION_ANSWER_TOKENS = 24  # "The code of <name> is 1234567." and a little room
MIN_PASSAGE_TOKENS = 16
_TEMPLATE_TOKENS = 16  # a turn's chat-template tokens, at most, on the models at hand
_SYSTEM_TOKENS = 64  # a default system prompt the template may add once
_PROBE_TOKENS = 64  # positions a conversation keeps free for its compression probe
_FIRST = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ingrid", "Jonas",
    "Kenji", "Leila", "Marco", "Nadia", "Oscar", "Priya", "Quentin", "Rosa", "Sven", "Tamara",
    "Umar", "Vera", "Wendell", "Yara",
)  # fmt: skip
_LAST = (
    "Alvarez", "Berg", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Hansen", "Ito",
    "Jensen", "Kowalski", "Larsen", "Moreau", "Novak", "Okafor", "Petrov", "Quinn", "Rossi",
    "Sato", "Tanaka", "Urban", "Varga", "Weber", "Young",
)  # fmt: skip
FILLER_TASKS = (
    "Summarise the following text in one sentence.",
    "What is the main topic of this passage?",
    "Give this passage a short title.",
    "Explain the following text to a beginner in one sentence.",
    "List two key terms from this passage.",
    "Is the following text formal or informal? Answer briefly.",
    "Rewrite the first sentence of this text in simpler words.",
    "What question does this passage answer?",
)
FACTS = ("first", "inside")  # the fact's own first turn, or a sentence inside a passage
INSIDE_TURNS = (1, 2, 3)  # `inside`: the turns (0-based) whose passage may hold the fact
INSIDE_DEPTHS = (0.25, 0.5, 0.75)  # `inside`: where in that passage
GREETING = "Hello! I will send you a few texts to work on, one at a time."
_ID = re.compile(r"^chat/L(\d+)/s(\d+)(/inside)?$")


@dataclass(frozen=True)
class ChatSpec:
    length: int  # tokens of the ten user messages' text together
    seed: int
    fact: str = "first"  # where the fact is: FACTS

    def __post_init__(self) -> None:
        if self.fact not in FACTS:
            raise ValueError(f"unknown chat fact {self.fact!r}; choose from {', '.join(FACTS)}")

    @property
    def id(self) -> str:
        suffix = "" if self.fact == "first" else f"/{self.fact}"
        return f"chat/L{self.length}/s{self.seed}{suffix}"

    @classmethod
    def from_id(cls, case_id: str) -> ChatSpec:
        """The spec a case id names (ids are the reproducible handle of a case)."""
        match = _ID.match(case_id)
        if match is None:
            raise ValueError(f"{case_id!r} is not a chat case id (chat/L<tokens>/s<seed>[/inside])")
        fact = "inside" if match.group(3) else "first"
        return cls(int(match.group(1)), int(match.group(2)), fact)


@dataclass(frozen=True)
class ChatCase:
    spec: ChatSpec
    turns: tuple[str, ...]  # the ten user messages: the fact, eight filler turns, the question
    name: str  # whose code the fact gives
    value: str  # the 7-digit code: what the last answer must hold
    sources: tuple[str, ...]  # where the passages came from
    fact_turn: int = 0  # the turn (0-based) that states the fact


def make_chat_case(spec: ChatSpec, tokenizer: Tokenizer) -> ChatCase:
    """The conversation `spec` names: its user messages total about spec.length tokens."""
    rng = random.Random(spec.id)
    name = f"{rng.choice(_FIRST)} {rng.choice(_LAST)}"
    value = str(rng.randrange(1_000_000, 10_000_000))
    tasks = rng.sample(FILLER_TASKS, FILLER_TURNS)
    layout = _fact_layout(spec.fact, rng, name, value)
    count = counter(tokenizer)
    fixed = sum(count(task + "\n\n") for task in tasks) + count(layout.first_turn)
    fixed += count(layout.question) + (count(" " + layout.needle) if layout.needle else 0)
    passage_tokens = (spec.length - fixed) // FILLER_TURNS
    if passage_tokens < MIN_PASSAGE_TOKENS:
        raise ValueError(f"chat length {spec.length} is too short for its eight passages")
    stream = filler_stream("prose", spec.seed)  # each turn takes the next passage
    needles = {layout.host - 1: [(layout.depth, layout.needle)]} if layout.needle else {}
    passages = [
        build_haystack(stream, passage_tokens, needles.get(i, []), count) for i in range(len(tasks))
    ]
    fillers = [f"{task}\n\n{p.text}" for task, p in zip(tasks, passages, strict=True)]
    sources = tuple(dict.fromkeys(s for p in passages for s in p.sources))
    turns = (layout.first_turn, *fillers, layout.question)
    return ChatCase(spec, turns, name, value, sources, layout.host)


@dataclass(frozen=True)
class _FactLayout:
    """Where a case's fact goes and how it is asked for."""

    first_turn: str  # the fact itself (`first`) or a greeting (`inside`)
    question: str  # turn 10
    needle: str = ""  # `inside`: the fact's sentence, put into the host turn's passage
    host: int = 0  # the turn (0-based) that states the fact
    depth: float = 0.0  # `inside`: where in the host turn's passage


def _fact_layout(fact: str, rng: random.Random, name: str, value: str) -> _FactLayout:
    """The layout of `fact` (FACTS); `inside` draws its host turn and depth from `rng`."""
    if fact == "first":
        return _FactLayout(_fact(name, value), _question(name))
    host, depth = rng.choice(INSIDE_TURNS), rng.choice(INSIDE_DEPTHS)
    return _FactLayout(GREETING, _question_inside(name), _fact_sentence(name, value), host, depth)


def _fact(name: str, value: str) -> str:
    return (
        f"Please remember this: the locker code of {name} is {value}. I will ask you for it "
        "at the end of our chat."
    )


def _fact_sentence(name: str, value: str) -> str:
    return f"The locker code of {name} is {value}."


def _question(name: str) -> str:
    return f"What is the locker code of {name} that I told you at the start?"


def _question_inside(name: str) -> str:
    return f"What is the locker code of {name}?"  # short: an answer echoes the question


def check_chat_policy(spec: PolicySpec) -> None:
    """ValueError for a policy a conversation cannot run: Quest (it reads pages, it does not
    compress the arena), the needle oracle (no needle), a window policy told not to observe
    KVzip's probe (after an answer there is no question whose queries could score the arena)."""
    name, uses_quest = parse_policy(spec.policy)
    if uses_quest:
        raise ValueError(f"a conversation does not run Quest: drop {spec.label!r} from --policies")
    if spec.needle_oracle:
        raise ValueError("needle-oracle has no needle in a chat: drop it from --policies")
    observe = spec.options.get("observe", "repeat")
    if POLICIES[name].observes_window and observe != "repeat":
        raise ValueError(
            f"policy spec {spec.label!r}: a conversation scores with KVzip's probe; drop "
            f"observe={observe}"
        )


def conversation_tokens(length: int) -> int:
    """Positions a conversation of `length` user tokens needs, at most: its turns with their
    template, every answer, and the room its compression probe keeps free."""
    answers = FILLER_TURNS * FILLER_ANSWER_TOKENS + QUESTION_ANSWER_TOKENS
    return length + TURNS * _TEMPLATE_TOKENS + _SYSTEM_TOKENS + answers + _PROBE_TOKENS


def check_chat_length(length: int, context: int | None) -> None:
    """ValueError when `length` user tokens leave the passages too short, or the conversation
    does not fit the model's `context` (None: not known yet)."""
    least = FILLER_TURNS * MIN_PASSAGE_TOKENS * 2
    if length < least:
        raise ValueError(f"chat length {length} is too short: give at least {least} tokens")
    needed = conversation_tokens(length)
    if context is not None and needed > context:
        raise ValueError(
            f"chat length {length}: the ten turns and their answers need up to {needed} "
            f"tokens, more than the model's {context}-token context"
        )


@dataclass(frozen=True)
class ChatOutcome:
    answers: tuple[str, ...]  # the model's answer to each turn
    correct: bool  # the last answer holds the code
    tokens_seen: int  # when the question was asked
    kept_tokens: float  # slots a (layer, kv head) held when the question was asked
    fact_kept: list[float]  # per layer: share of the code's tokens held then
    seconds: float


def converse(conversation: Conversation, case: ChatCase) -> ChatOutcome:
    """Runs the case's ten turns in `conversation` (new: nothing sent yet), greedy, and looks
    at what its arena holds of the fact just before the question goes in."""
    if conversation.tokens_seen:
        raise ValueError("converse needs a new conversation: reset it first")
    began = time.perf_counter()
    answers, fact = [], []
    for turn, text in enumerate(case.turns[:-1]):
        start = conversation.next_position
        output = conversation.send(text, SamplingParams(max_new_tokens=FILLER_ANSWER_TOKENS))
        answers.append(output.text)
        if turn == case.fact_turn:  # the turn's token indices, from where it starts
            found = token_positions(conversation.tokenizer, output.prompt_token_ids, (case.value,))
            fact = [start + index for index in found]
    question = case.turns[-1]
    seen, held = conversation.tokens_seen, conversation.stats().kept_mean
    kept = kept_share(conversation.state, fact)
    params = SamplingParams(max_new_tokens=QUESTION_ANSWER_TOKENS)
    answers.append(conversation.send(question, params).text)
    correct = score(answers[-1], (case.value,)) == 1.0
    seconds = time.perf_counter() - began
    return ChatOutcome(tuple(answers), correct, seen, held, kept, seconds)
