"""A multi-turn chat in one arena: `Conversation`, the library form of `nanokv chat`.

Every turn goes into the same arena (one DecodeState): the user's message as the chat template's
turn tokens, then the answer, decoded into the arena; after each answer the arena is compressed
back to the budget and the next turn continues from it. Nothing is ever re-prefilled.

- Turn tokens: the template is rendered incrementally. The ids of turn k are those of the whole
  conversation rendered after turn k less the tokens the arena has already seen, when they are
  a prefix of it; otherwise (the tokenizer splits an earlier answer's text differently from the
  tokens the model produced) the turn is the text the template adds after that answer, found by
  rendering a marker in the answer's place, and encoded on its own. Either way the rendering up
  to the new turn must be the one the arena saw: a template that renders earlier turns
  differently once a turn is added is a clear error, and the conversation stays as it was.
- Recompression: after each answer the arena keeps the budget applied to the tokens seen (a
  fraction of them, or a count) a (layer, kv head) on average, never below the cache floor,
  shared out by the policy's allocation (`EvictionStage.reselect`: one model-wide top-k for
  `global`). A policy that scores from an observation window (snapkv, laprox, tova) ranks the
  slots with KVzip's probe run against the arena (the next question is unknown:
  nanokv/recompress.py), repeating the conversation's tokens that some head still holds: an
  evicted token has no key left to score, and repeating every token seen made each
  recompression a pass over the whole conversation, the larger part of a turn's time (the
  same recalls on `nanokv eval chat`'s suites, docs/eval.md; `bench/chat.py`); streaming, h2o
  and auv rank them with their own eviction scores (recency, accumulated attention, usage
  counts; AUV keeps no reconstructed slot here).
  The sinks and the policy's observation window (none with the probe) are protected. A policy
  that shares sentences under the probe (laprox by default) recompresses through its turn
  memory instead: every head keeps the same sinks, whole turns (or their sentences) ranked by
  the best probe weight they have had, and latest tokens (nanokv/turn_memory.py). `full`, or
  a budget of 1.0, keeps everything. (Probing only the turns since the last compression, each
  older slot keeping the score it got then, ran 3.5x faster but recalled less on `nanokv eval
  chat`: docs/eval.md; the held tokens' probe re-scores every slot.)
- Room: nothing is evicted while a turn is written and answered, so before each turn the arena
  is grown (one reallocation, only when it lacks room) to hold the turn and max_new_tokens more.
  Positions never pass the model's context; with the probe, the positions its segments need
  after the last answer are kept free too.
- Ctrl-C: a KeyboardInterrupt raised by `on_text` (between two decode steps, where the arena is
  whole) stops the answer; what was generated stays in the conversation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from nanokv.engine import DecodeState, Engine, InputError, Sequence
from nanokv.information import InformationTrail
from nanokv.llm import LLM, GenerationOutput
from nanokv.probe import Probe, segment_overhead
from nanokv.sampling import Sampler, SamplingParams
from nanokv.stopping import StopChecker
from nanokv.turn_memory import TurnMemory

TextStream = Callable[[str], None]
PROBE_MIN_SPAN = 32  # tokens: near the context's end the probe's spans shrink no further
_MARK = "\u2063nanokv-answer\u2063"


@dataclass(frozen=True)
class ConversationStats:
    """What `/stats` prints: tokens seen and kept, and the arena's bytes vs a full cache."""

    turns: int
    tokens_seen: int
    kept_mean: float  # slots held per (layer, kv head)
    kept_min: int
    kept_max: int
    arena_bytes: int  # allocated: K, V, slot metadata and the room for the next turn
    kv_bytes: int  # K and V of the slots held
    full_cache_bytes: int  # K and V of every token seen, same dtype

    def line(self) -> str:
        """One line for `/stats`."""
        share = self.kv_bytes / max(self.full_cache_bytes, 1)
        return (
            f"turns {self.turns}, tokens seen {self.tokens_seen}; kept per head: mean "
            f"{self.kept_mean:.1f}, min {self.kept_min}, max {self.kept_max}; arena "
            f"{_mib(self.arena_bytes)} allocated, K/V held {_mib(self.kv_bytes)} = {share:.1%} "
            f"of a full cache of the tokens seen ({_mib(self.full_cache_bytes)})"
        )


def _mib(count: int) -> str:
    return f"{count / 2**20:.2f} MiB ({count:,} bytes)"


class Conversation:
    """A multi-turn chat on `llm` (its model, policy and budget) in one compressed arena."""

    def __init__(self, llm: LLM, params: SamplingParams | None = None) -> None:
        """`params`: the sampling of every answer unless `send` is given others."""
        if llm.tokenizer.chat_template is None:
            raise InputError("a conversation needs a model with a chat template")
        if llm.quest is not None:
            raise ValueError("a conversation does not run Quest: use a policy without +quest")
        self.llm, self.tokenizer = llm, llm.tokenizer
        self.params = params or SamplingParams()
        self.reset()

    def reset(self) -> None:
        """Starts a fresh conversation: the arena is dropped, and the LLM's policy and budget as
        they are now apply from here on."""
        self.engine = _engine(self.llm)
        self.state: DecodeState | None = None
        self.messages: list[dict[str, str]] = []  # as the template renders them
        self._ids: list[int] = []  # every token of the conversation, the arena's then pending
        self._pending: list[int] = []  # the last answer's final token: not in the arena yet
        self._rendered = ""  # the template's rendering after the last user turn
        weighs = self.engine.policy.options.information and self.engine.policy.evicts
        self._trail = InformationTrail() if weighs else None  # by position, for _compress
        self._memory = _turn_memory(self.engine)  # whole turns every head keeps, or None

    @property
    def tokens_seen(self) -> int:
        """Tokens written to the arena so far (kept or evicted)."""
        return 0 if self.state is None else int(self.state.positions[0])

    @property
    def next_position(self) -> int:
        """The position the next user turn's first token takes: every token rendered so far,
        the last answer's final token (written with the next turn) included."""
        return len(self._ids)

    def send(
        self, text: str, params: SamplingParams | None = None, on_text: TextStream | None = None
    ) -> GenerationOutput:
        """Appends a user turn, decodes the answer into the arena (`on_text` receives each new
        piece of its text) and compresses the arena back to the budget. An InputError (an
        empty turn, one that does not fit the context) leaves the conversation as it was. The
        result's prompt_token_ids are the turn's tokens; finish_reason may be "interrupted"."""
        params = params or self.params
        if not text.strip():
            raise InputError("the turn is empty: type a message (or /exit)")
        turn, rendered = self._turn_ids(text)
        feed = self._pending + turn
        self._check_room(turn, len(feed), params.max_new_tokens)
        logits = self._append(feed, params.max_new_tokens)
        self.messages.append({"role": "user", "content": text})
        self._begin_span()
        self._ids, self._pending, self._rendered = self._ids + turn, [], rendered
        stopper = StopChecker(
            self.tokenizer.decode, self.llm.eos_token_ids, params.stop, params.ignore_eos
        )
        seq = self._answer(logits, turn, params, stopper, on_text)
        self._keep_answer(seq.token_ids, stopper.eos_token_ids)
        self._compress()
        return GenerationOutput(text, turn, seq.text, seq.token_ids, seq.finish_reason)

    def stats(self) -> ConversationStats:
        """Tokens seen, slots kept per (layer, kv head), and bytes held vs a full cache."""
        if self.state is None:
            return ConversationStats(0, 0, 0.0, 0, 0, 0, 0, 0)
        cfg, seen, arena = self.llm.config, self.tokens_seen, self.state.arena
        element = arena.element_size
        per_token = cfg.num_kv_heads * cfg.head_dim * element  # one layer's K (or V)
        lengths = arena.lengths.long()  # (L, 1, H_kv)
        return ConversationStats(
            turns=len(self.messages) // 2, tokens_seen=seen,
            kept_mean=float(lengths.float().mean()), kept_min=int(lengths.min()),
            kept_max=int(lengths.max()), arena_bytes=arena.nbytes,
            kv_bytes=2 * int(lengths.sum()) * cfg.head_dim * element,
            full_cache_bytes=2 * cfg.num_layers * seen * per_token,
        )  # fmt: skip

    # --- one turn ---------------------------------------------------------------------------

    def _turn_ids(self, text: str) -> tuple[list[int], str]:
        """(the turn's token ids, the conversation rendered after it), see the module's notes."""
        messages = [*self.messages, {"role": "user", "content": text}]
        rendered = self.tokenizer.apply_chat_template(messages)
        ids = self.tokenizer.encode(rendered, add_special_tokens=False)
        if ids[: len(self._ids)] == self._ids:
            return ids[len(self._ids) :], rendered
        after = self._text_after_answer(messages)
        return self.tokenizer.encode(after, add_special_tokens=False), rendered

    def _text_after_answer(self, messages: list[dict[str, str]]) -> str:
        """What the template renders after the last answer up to the new turn's end; the
        rendering before that answer must be the one the arena saw."""
        marked = [*messages[:-2], {"role": "assistant", "content": _MARK}, messages[-1]]
        text = self.tokenizer.apply_chat_template(marked)
        if text.count(_MARK) != 1 or not text.startswith(self._rendered + _MARK):
            raise InputError(
                "the chat template renders the earlier turns differently once a turn is added, "
                "so the turn cannot be appended to the conversation: /reset starts a new one"
            )
        return text.split(_MARK)[1]

    def _check_room(self, turn: list[int], feed: int, max_new: int) -> None:
        """InputError unless the turn, max_new tokens (and the probe after them) fit the
        model's context after the tokens already seen."""
        context = self.llm.config.max_position_embeddings
        reserve = self._probe_reserve(self._ids or turn)
        kept_free = f", {reserve} of them kept free for the compression probe" if reserve else ""
        if len(turn) + max_new + reserve > context:
            raise InputError(
                f"the turn has {len(turn)} tokens and max_new_tokens is {max_new}: more than the "
                f"model's {context}-token context{kept_free}: shorten the turn"
            )
        seen = self.tokens_seen
        if seen + feed + max_new + reserve > context:
            raise InputError(
                f"the conversation has {seen} tokens and this turn needs {feed} + {max_new} "
                f"more, past the model's {context}-token context{kept_free}: /reset starts a "
                "new conversation"
            )

    def _append(self, feed: list[int], max_new: int) -> torch.Tensor:
        """Writes `feed` into the arena, grown first (one reallocation) so that the answer fits
        without an eviction. Returns the (1, vocab) logits of the last token."""
        room = len(feed) + max_new
        if self.state is None:
            self.state = self.engine.empty_state(room)
        else:
            arena = self.state.arena
            arena.grow(int(arena.lengths.max()) + room)  # no-op when it has the room
        return self.engine.extend(self.state, feed, self._trail)

    def _answer(
        self,
        logits: torch.Tensor,
        turn: list[int],
        params: SamplingParams,
        stopper: StopChecker,
        on_text: TextStream | None,
    ) -> Sequence:
        """The decode loop of `Engine.decode` for one sequence, stopped by a KeyboardInterrupt
        from `on_text` (finish reason "interrupted"). The last sampled token is never stepped."""
        seq = Sequence(list(turn))
        sampler = Sampler(params, 1, self.engine.device)
        for step in range(params.max_new_tokens):
            token = sampler(logits)  # (1,)
            delta = stopper.advance(seq, int(token[0]), step + 1 == params.max_new_tokens)
            if delta and on_text is not None and _interrupted(on_text, delta):
                seq.finish_reason = seq.finish_reason or "interrupted"
                break
            if seq.finish_reason is not None:
                break
            logits = self.engine.step(self.state, token)
            if self._trail is not None:
                self._trail.step_written(int(token[0]), logits)
        return seq

    def _keep_answer(self, tokens: list[int], eos: set[int]) -> None:
        """Records the answer (less a final EOS: the template's own end of turn follows it) as
        the assistant's message; its last token, sampled but never stepped, is pending: it
        goes into the arena first thing next turn."""
        answer = tokens[:-1] if tokens and tokens[-1] in eos else tokens
        if answer:
            self._begin_span()
        self._ids += answer
        self._pending = answer[len(tokens) - 1 :]
        self.messages.append({"role": "assistant", "content": self.tokenizer.decode(answer)})

    def _compress(self) -> None:
        """Brings every (layer, kv head) back to the budget of the tokens seen."""
        seen = self.tokens_seen
        cache = self._cache_tokens(seen)
        if not self.engine.policy.evicts or int(self.state.arena.lengths.max()) <= cache:
            return
        probe = self._probe(seen)
        information = None if self._trail is None else self._trail.values()
        self.engine.recompress(self.state, cache, probe, information, self._memory)
        arena = self.state.arena  # between turns each head holds only what it kept
        arena.pack_heads(arena.lengths)  # (the next turn grows it back to one rectangle)

    def _probe(self, seen: int) -> Probe | None:
        """KVzip's probe of the conversation's first `seen` tokens that the arena still holds
        in some head (`repeat_probe`'s `held`): each recompression then costs a pass over
        about the budget and the latest turn, not over the whole conversation again. None when
        the policy does not score with the probe."""
        if self.engine.policy.options.observe != "repeat":
            return None
        held = self.state.arena.held_positions(0)
        return self.engine.probe(self.tokenizer, self._ids[:seen], held=held)

    def _begin_span(self) -> None:
        """The turn or answer about to be appended starts a unit of the turn memory."""
        if self._memory is not None:
            self._memory.begin_span(len(self._ids))

    def _cache_tokens(self, seen: int) -> int:
        """Slots a head keeps after an answer: the budget of `seen` tokens, never below the
        floor (nor, with a floor, below the sinks and the observation window)."""
        budget, options = self.engine.budget, self.engine.policy.options
        floor = max(budget.floor, options.sinks + options.observation_window)
        return max(budget.cache_tokens(seen, 0), floor if budget.floor else 0)

    def _probe_reserve(self, ids: list[int]) -> int:
        """Positions kept free after the answer for the probe: none without one."""
        if not _uses_probe(self.engine):
            return 0
        return segment_overhead(self.tokenizer, ids) + PROBE_MIN_SPAN


def _engine(llm: LLM) -> Engine:
    """The engine that compresses a conversation: `LLM.compress`'s, whose policy observes
    KVzip's probe when it has an observation window (the next question is unknown)."""
    policy = llm.compress_engine.policy
    if policy.observes_window and policy.options.observe != "repeat":
        raise ValueError(
            f"a conversation compresses with KVzip's probe: observe='{policy.options.observe}' "
            f"has no queries to score the arena with; leave observe unset for {policy.name!r}"
        )
    return llm.compress_engine


def _turn_memory(engine: Engine) -> TurnMemory | None:
    """The memory of whole turns when the conversation is compressed with KVzip's probe and its
    policy shares sentences (laprox by default: nanokv/turn_memory.py), else None."""
    options = engine.policy.options
    if not (_uses_probe(engine) and options.sentences):
        return None
    return TurnMemory(options.sentences, options.sinks)


def _uses_probe(engine: Engine) -> bool:
    """True when the conversation is compressed with KVzip's probe (it ever evicts, and its
    policy observes a window)."""
    policy = engine.policy
    return policy.evicts and policy.options.observe == "repeat" and engine.budget.value != 1.0


def _interrupted(on_text: TextStream, text: str) -> bool:
    """Calls on_text(text); True when it raised KeyboardInterrupt (Ctrl-C)."""
    try:
        on_text(text)
    except KeyboardInterrupt:
        return True
    return False
