"""The public API in the vLLM shape: `LLM(path, **options).generate(prompts, params)`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from nanokv.budget import Budget
from nanokv.context import CompressedContext, split_context
from nanokv.dtypes import resolve_dtype, resolve_kv_dtype
from nanokv.engine import Engine, InputError, TextCallback
from nanokv.loader import load_config, load_model, resolve_model_dir
from nanokv.models import set_kv_dtype
from nanokv.policies import POLICIES, Policy, make_policy, parse_policy, policy_for_budget
from nanokv.pool import KVPool
from nanokv.report import CacheReport
from nanokv.sampling import SamplingParams
from nanokv.scheduler import Scheduler
from nanokv.sequence import Request, RequestEvent
from nanokv.sparsity import QuestOptions
from nanokv.stopping import StopChecker
from nanokv.tokenizer import Tokenizer

if TYPE_CHECKING:
    from nanokv.conversation import Conversation

UNBOUNDED = 2**31
UNBOUNDED_BYTES = 2**62
DEFAULT_MIN_CACHE = 128  # tokens: no head is cut below this, short prompts are never evicted


@dataclass
class GenerationOutput:
    """One prompt's result, in submission order."""

    prompt: str | list[dict[str, str]]
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str


class LLM:
    """A loaded model, its tokenizer and an engine with an eviction policy.

    `model` is an HF-layout directory (Llama, Mistral or OPT); None uses the embedded default
    model (SmolLM2-135M-Instruct), converting it into `weights/` on first use. `dtype` None or
    "auto" picks bf16 where the device does bf16 natively and fp32 elsewhere (nanokv/dtypes.py);
    `dtype_reason` says why. `kv_dtype` is the KV cache's (and attention's) dtype: None or
    "auto" the model's, or e.g. "bfloat16" under fp32 weights for half the cache bytes
    (nanokv/models/kv_dtype.py).
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        policy: str | None = None,
        budget: float | Budget = 1.0,
        dtype: str | torch.dtype | None = None,
        kv_dtype: str | torch.dtype | None = None,
        device: str | torch.device | None = None,
        prefill_chunk: int = 512,
        min_cache: int = DEFAULT_MIN_CACHE,
        quest_budget: float | None = None,
        quest_oracle: bool = False,
        quest_dense_layers: int = 2,
        **policy_options,
    ) -> None:
        """`policy` is a name ('snapkv'), 'quest', or '<name>+quest'; None runs the full cache
        at a budget of 1.0 and LaProx (`DEFAULT_POLICY`) at any smaller one. `min_cache` is the
        cache floor in tokens (0: the budget is exact, even on a short prompt). `policy_options` are
        PolicyOptions fields (sinks, observation_window, pool, chunk, decode_window, allocation,
        min_head_share, max_head_share, normalise, usage_top_k, usage_decay, reconstruct,
        observe); unset ones take the policy's defaults. `compress` scores with KVzip's probe
        (observe="repeat") unless `observe` is given; `generate` and `chat` use the policy's."""
        self.min_cache = min_cache
        self.device = _resolve_device(device)
        self.dtype, self.dtype_reason = resolve_dtype(dtype, self.device)
        self.kv_dtype = resolve_kv_dtype(kv_dtype, self.dtype)
        self.prefill_chunk = prefill_chunk
        self.model_dir = _model_dir(model)
        self.config = load_config(self.model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        self.configure(
            policy, budget, quest_budget, quest_oracle, quest_dense_layers, **policy_options
        )
        self.model = load_model(self.model_dir, self.config, self.dtype, self.device)
        set_kv_dtype(self.model, self.kv_dtype)
        self._build_engine()
        self.eos_token_ids = self._eos_token_ids()

    def configure(
        self,
        policy: str | None = None,
        budget: float | Budget = 1.0,
        quest_budget: float | None = None,
        quest_oracle: bool = False,
        quest_dense_layers: int = 2,
        min_cache: int | None = None,
        **policy_options,
    ) -> None:
        """Switches policy and budget without reloading the model (what an evaluation grid
        needs); `policy` None picks by budget (`policy_for_budget`), and 'full' with a budget
        below 1.0 is a ValueError. A number `budget` takes the cache floor `min_cache` (default:
        the LLM's); a Budget is used as given. A Quest read budget defaults to the budget for
        plain 'quest' and to half the eviction budget for '<name>+quest'. Also builds the
        query-agnostic policy that `compress` runs (see `_compress_policy`)."""
        if min_cache is not None:
            self.min_cache = min_cache
        if isinstance(budget, Budget):
            self.budget = budget
        else:
            self.budget = Budget(budget, floor=self.min_cache)
        policy = policy_for_budget(policy, self.budget.value)
        name, uses_quest = parse_policy(policy)
        self.policy = make_policy(name, **policy_options)
        self.compress_policy = self._compress_policy(name, policy_options)
        self.quest = None
        if uses_quest:
            read = quest_budget
            if read is None:
                read = self.budget.value if name == "full" else _half(self.budget)
            self.quest = QuestOptions(
                budget=Budget(read), dense_layers=quest_dense_layers, oracle=quest_oracle
            )
            if name == "full":
                self.budget = Budget(1.0)
        self._scheduler: Scheduler | None = None
        if hasattr(self, "model"):
            self._build_engine()

    def _compress_policy(self, name: str, options: dict[str, object]) -> Policy:
        """What `compress` runs: the question is unknown there, so a policy with an observation
        window observes KVzip's probe ("repeat", with REPEAT_DEFAULTS for the options not
        given) unless `observe` was given explicitly; any other policy is the configured one."""
        if options.get("observe") is not None or not POLICIES[name].observes_window:
            return self.policy
        return make_policy(name, **{**options, "observe": "repeat"})

    def _build_engine(self) -> None:
        self.engine = self._engine(self.policy)
        self.compress_engine = self.engine
        if self.compress_policy is not self.policy:
            self.compress_engine = self._engine(self.compress_policy)

    def _engine(self, policy: Policy) -> Engine:
        return Engine(
            self.model, self.config, policy, budget=self.budget, quest=self.quest,
            prefill_chunk=self.prefill_chunk,
        )  # fmt: skip

    @property
    def last_report(self) -> CacheReport | None:
        """What the last generate call kept and what it cost."""
        return self.engine.last_report

    def generate(
        self,
        prompts: str | list[str],
        params: SamplingParams | None = None,
        *,
        context: CompressedContext | None = None,
        answer_prefix: str = "",
        on_text: TextCallback | None = None,
        **options,
    ) -> list[GenerationOutput]:
        """Completes raw prompts (no chat template). `options` are SamplingParams fields.
        With `context`, each prompt is a question appended to that compressed document, and
        `answer_prefix` primes the start of each answer."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params or SamplingParams(**options)
        if context is not None:
            return self._ask(context, prompts, params, on_text, answer_prefix)
        ids = [self.tokenizer.encode(p) for p in prompts]
        return self._run(prompts, ids, params, on_text)

    def compress(
        self, text: str, *, chat: bool = True, max_question_tokens: int = 256,
        max_new_tokens: int = 256,
    ) -> CompressedContext:  # fmt: skip
        """Prefills and compresses a document once with the current policy and budget; then
        `generate(questions, context=...)` answers each question from a copy of it. Nothing is
        evicted while a question and its answer are processed. The question is unknown here, so
        a policy with an observation window scores with KVzip's probe (observe="repeat") unless
        `observe` was configured explicitly."""
        ids, suffix = split_context(self.tokenizer, text, chat)
        reserve = max_question_tokens + max_new_tokens
        engine = self.compress_engine
        probes = engine.probes(self.tokenizer, [ids])
        state, _ = engine.start([ids], reserve, decode_window=reserve, probes=probes)
        report = engine.report(state, [ids], reserve)
        self.engine.last_report = engine.last_report = report
        return CompressedContext(state, ids, suffix, reserve, report.policy)

    def conversation(self, params: SamplingParams | None = None) -> Conversation:
        """A multi-turn chat in one arena, compressed back to the budget after each answer
        with the query-agnostic scorer (nanokv/conversation.py); `params` sample its answers."""
        from nanokv.conversation import Conversation

        return Conversation(self, params)

    def _ask(
        self,
        context: CompressedContext,
        questions: list[str],
        params: SamplingParams,
        on_text: TextCallback | None,
        answer_prefix: str = "",
    ) -> list[GenerationOutput]:
        """Each question as a request that continues a copy of the compressed context with the
        engine that compressed it; the questions decode together in one batch."""
        ids = []
        for index, question in enumerate(questions):
            question_ids = context.question_ids(self.tokenizer, question, answer_prefix)
            if len(question_ids) + params.max_new_tokens > context.reserve:
                raise InputError(
                    f"question {index} ({len(question_ids)} tokens) and {params.max_new_tokens} "
                    f"new tokens exceed the {context.reserve} tokens reserved by compress()"
                )
            ids.append(question_ids)
        engine = self.compress_engine  # the policy that compressed the context
        requests = [Request(i, params, context=context.state, engine=engine) for i in ids]
        results = self.run_requests(requests, on_text)
        return [
            GenerationOutput(q, i, r.text, r.token_ids, r.finish_reason)
            for q, i, r in zip(questions, ids, results, strict=True)
        ]

    def _stopper(self, params: SamplingParams) -> StopChecker:
        return StopChecker(
            self.tokenizer.decode, self.eos_token_ids, params.stop, params.ignore_eos
        )

    def chat(
        self,
        conversations: str | list[str] | list[list[dict[str, str]]],
        params: SamplingParams | None = None,
        *,
        context: CompressedContext | None = None,
        answer_prefix: str = "",
        on_text: TextCallback | None = None,
        **options,
    ) -> list[GenerationOutput]:
        """Answers user messages (or whole conversations) through the model's chat template.
        With `context` (from `compress`), the messages are questions about that document.
        `answer_prefix` primes the start of each answer (e.g. "The value is")."""
        if isinstance(conversations, str):
            conversations = [conversations]
        params = params or SamplingParams(**options)
        if context is not None:
            return self._ask(context, list(conversations), params, on_text, answer_prefix)
        chats = [
            [{"role": "user", "content": c}] if isinstance(c, str) else c for c in conversations
        ]
        primed = self.tokenizer.encode(answer_prefix, add_special_tokens=False)
        ids = [self.tokenizer.encode_chat(chat) + primed for chat in chats]
        return self._run(chats, ids, params, on_text)

    def _run(self, prompts, ids, params: SamplingParams, on_text) -> list[GenerationOutput]:
        """Runs the prompts as requests through the scheduler, the server's path: admitted,
        prefilled a layer at a time and decoded in one continuous batch."""
        for index, prompt_ids in enumerate(ids):
            if not prompt_ids:
                raise InputError(f"prompt {index} is empty: give at least one token of text")
        self.engine.check_prompts(ids, params.max_new_tokens)
        engine = self._requests().engine_for(None, None)
        engine.eviction.seconds = 0.0
        requests = [Request(prompt_ids, params, report=True) for prompt_ids in ids]
        results = self.run_requests(requests, on_text)
        reports = [result.report for result in results]
        self.engine.last_report = CacheReport.combine(reports, engine.eviction.seconds)
        return [
            GenerationOutput(p, i, r.text, r.token_ids, r.finish_reason)
            for p, i, r in zip(prompts, ids, results, strict=True)
        ]

    def run_requests(
        self, requests: list[Request], on_text: TextCallback | None = None
    ) -> list[RequestOutput]:
        """Runs requests (each with its own policy, budget, sampling, or engine) through the
        scheduler, the server's path, until all of them are done; `generate` and `chat` are
        this with one request a prompt. A request that failed raises RuntimeError."""
        scheduler = self._requests()
        results = [RequestOutput(index, on_text) for index in range(len(requests))]
        for request, result in zip(requests, results, strict=True):
            scheduler.submit(request, result)
        while not scheduler.idle():
            scheduler.step()
        for result in results:
            if result.error is not None:
                raise RuntimeError(f"generation failed: {result.error}")
        return results

    def _requests(self) -> Scheduler:
        """The scheduler `generate` and `chat` submit to: an unbounded pool (a library call
        holds what it asks for), made again when the policy changes."""
        if self._scheduler is None:
            self._scheduler = Scheduler(self, KVPool(UNBOUNDED_BYTES), max_waiting=UNBOUNDED)
        return self._scheduler

    def _eos_token_ids(self) -> set[int]:
        ids = set(self.config.eos_token_ids) | self.tokenizer.eos_token_ids
        path = self.model_dir / "generation_config.json"
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            ids |= set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return ids


class RequestOutput:
    """One request's events gathered into its output (and streamed to `on_text`): its text,
    token ids, why it finished, and its CacheReport when the request asked for one."""

    def __init__(self, index: int, on_text: TextCallback | None) -> None:
        self.index, self.on_text = index, on_text
        self.text, self.token_ids = "", []
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.report: CacheReport | None = None

    def __call__(self, event: RequestEvent) -> None:
        self.text += event.text
        self.token_ids += event.token_ids
        if event.text and self.on_text is not None:
            self.on_text(self.index, event.text)
        if event.finished:
            self.finish_reason, self.error, self.report = (
                event.finish_reason,
                event.error,
                event.report,
            )


def _half(budget: Budget) -> float:
    """Half of a budget, as a fraction or a whole count."""
    return budget.value / 2 if budget.is_fraction else float(max(2, int(budget.value) // 2))


def _model_dir(model: str | Path | None) -> Path:
    if model is not None:
        return resolve_model_dir(model)
    from nanokv.default_model import ensure_default_model

    return ensure_default_model()


def _resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device to run on (None: cuda when torch sees one, else cpu). A device this
    machine lacks or a misspelt one is a ValueError with a fix, not a traceback from deep in
    torch when the first tensor is moved."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported: use cpu, cuda or cuda:N")
    if resolved.type == "cuda":
        _check_cuda(device, resolved.index or 0)
    return resolved


def _check_cuda(device: str | torch.device, index: int) -> None:
    """Raises a ValueError when torch cannot reach CUDA device `index` on this machine."""
    if not torch.cuda.is_available():
        raise ValueError(
            f"CUDA was asked for (--device {device}) but torch sees no CUDA device on this "
            "machine: use --device cpu"
        )
    if index >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r} does not exist: torch sees {torch.cuda.device_count()} CUDA "
            "device(s), numbered from 0"
        )
