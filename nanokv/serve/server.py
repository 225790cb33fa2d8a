"""Running the app: uvicorn on a background thread (`ServerThread`), a whole server of a loaded
model in one call (`start_server`, for tests and benchmarks), and `nanokv serve` (`run_server`).

The socket is bound before anything else, in the caller's thread: a busy port is an OSError
there, not a log line from a dying thread, and `nanokv serve` answers /health (503) while the
model loads.
"""

from __future__ import annotations

import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI

from nanokv.engine import Engine
from nanokv.policies import make_policy
from nanokv.pool import PAGE_SIZE, KVPool
from nanokv.scheduler import PREFILL_SHARE, Scheduler
from nanokv.serve.app import DEFAULT_MAX_BODY_BYTES, build_app

if TYPE_CHECKING:
    from nanokv.llm import LLM

DEFAULT_KV_MEMORY = 1 << 30  # 1 GiB
GRACEFUL_SHUTDOWN_SECONDS = 5  # open streams get this long to finish; then they are cancelled


class ServerThread:
    """A uvicorn server of `app` on a daemon thread, bound to host:port (0: a free port)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        self._socket = _bind(host, port)
        self.host, self.port = host, self._socket.getsockname()[1]
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name="nanokv-http",
            daemon=True,
        )  # fmt: skip

    @property
    def url(self) -> str:
        """http://host:port, with a wildcard host replaced by the loopback address."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerThread:
        """Starts serving; returns once the app has started (RuntimeError if it did not)."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the HTTP server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def wait(self) -> None:
        """Blocks until the server stops; Ctrl-C (KeyboardInterrupt) still reaches the caller."""
        while self._thread.is_alive():
            self._thread.join(0.5)

    def stop(self) -> None:
        """Stops accepting, lets open requests finish (GRACEFUL_SHUTDOWN_SECONDS), closes."""
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(GRACEFUL_SHUTDOWN_SECONDS + 5)
        self._socket.close()


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; OSError (with the address) when that fails."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


@dataclass
class ServerHandle:
    """A running server: `base_url` is what `openai.OpenAI(base_url=...)` takes (…/v1), `url`
    the root (/health, /stats). `stop` stops the HTTP server, then the scheduler."""

    thread: ServerThread
    llm: LLM
    scheduler: Scheduler
    pool: KVPool

    @property
    def url(self) -> str:
        return self.thread.url

    @property
    def base_url(self) -> str:
        return f"{self.thread.url}/v1"

    def stop(self) -> None:
        self.thread.stop()
        self.scheduler.stop()

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def start_server(
    llm: LLM,
    *,
    policy: str | None = None,
    budget: float | None = None,
    kv_memory_bytes: int = DEFAULT_KV_MEMORY,
    max_kv_tokens: int | None = None,
    api_key: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    max_waiting: int = 64,
    model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    prefill_share: float = PREFILL_SHARE,
) -> ServerHandle:
    """Serves a loaded model on a background thread and returns once it answers. `policy` /
    `budget`: the KV settings of requests that set none (None: the LLM's). The pool holds
    `kv_memory_bytes`, or `max_kv_tokens` tokens of full cache when that is given;
    `prefill_share`: the scheduler's (`Scheduler`)."""
    capacity = kv_memory_bytes if max_kv_tokens is None else kv_bytes_for_tokens(llm, max_kv_tokens)
    pool = KVPool(capacity)
    scheduler = Scheduler(llm, pool, max_waiting=max_waiting, prefill_share=prefill_share)
    if policy is not None or budget is not None:
        scheduler.engine_for(policy, budget)  # ValueError now for a bad policy or budget
    app = build_app(
        llm, scheduler, model_name=model_name or llm.model_dir.name, api_key=api_key,
        max_body_bytes=max_body_bytes, policy=policy, budget=budget,
    )  # fmt: skip
    thread = ServerThread(app, host, port)
    scheduler.start()
    try:
        thread.start()
    except BaseException:
        scheduler.stop()
        raise
    return ServerHandle(thread, llm, scheduler, pool)


def kv_bytes_for_tokens(llm: LLM, tokens: int) -> int:
    """Bytes of a pool that holds `tokens` tokens of full (unevicted) cache, in whole pages."""
    if tokens < 1:
        raise ValueError(f"a KV pool must hold at least 1 token, got {tokens}")
    full = Engine(llm.model, llm.config, make_policy("full"))
    return full.arena_bytes(-(-tokens // PAGE_SIZE) * PAGE_SIZE)


@dataclass(frozen=True)
class ServeOptions:
    """`nanokv serve`'s server flags, checked before the model loads."""

    model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    kv_memory_bytes: int = DEFAULT_KV_MEMORY
    max_kv_tokens: int | None = None
    api_key: str | None = None
    max_waiting: int = 64
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    prefill_share: float = PREFILL_SHARE

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port must be in 0..65535, got {self.port}")
        if self.max_kv_tokens is not None and self.max_kv_tokens < 1:
            raise ValueError(f"--max-kv-tokens must be at least 1, got {self.max_kv_tokens}")
        if self.max_waiting < 1:
            raise ValueError(f"--max-waiting must be at least 1, got {self.max_waiting}")
        if not 0 <= self.prefill_share < 1:
            raise ValueError(f"--prefill-share must be in [0, 1), got {self.prefill_share}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key is empty: give a key or leave the flag out")

    def pool_bytes(self, llm: LLM) -> int:
        if self.max_kv_tokens is None:
            return self.kv_memory_bytes
        return kv_bytes_for_tokens(llm, self.max_kv_tokens)


def run_server(options: ServeOptions, load: Callable[[], LLM]) -> int:
    """`nanokv serve`: binds the port (answering 503 while loading), loads the model with
    `load`, starts the scheduler, prints one line to stderr when ready, serves until Ctrl-C."""
    app = build_app(
        None, None, model_name=options.model_name, api_key=options.api_key,
        max_body_bytes=options.max_body_bytes,
    )  # fmt: skip
    thread = ServerThread(app, options.host, options.port).start()
    scheduler = None
    try:
        llm = load()
        pool = KVPool(options.pool_bytes(llm))
        scheduler = Scheduler(
            llm, pool, max_waiting=options.max_waiting, prefill_share=options.prefill_share
        )
        scheduler.start()
        app.state.nanokv.attach(llm, scheduler)
        print(ready_line(thread.url, options.model_name, llm, pool), file=sys.stderr, flush=True)
        thread.wait()
    except KeyboardInterrupt:
        pass
    finally:
        thread.stop()
        if scheduler is not None:
            scheduler.stop()
    return 0


def ready_line(url: str, model_name: str, llm: LLM, pool: KVPool) -> str:
    """What `nanokv serve` prints once it serves: where, what, and how much KV memory."""
    cfg = llm.config
    per_token = kv_bytes_for_tokens(llm, PAGE_SIZE) // PAGE_SIZE
    budget = llm.budget.value
    return (
        f"nanokv serve: {url}/v1 model={model_name} policy={llm.policy.name} "
        f"budget={budget:g} kv-dtype={str(llm.kv_dtype).removeprefix('torch.')} "
        f"kv-pool={_size(pool.capacity_bytes)} "
        f"(~{pool.capacity_bytes // per_token} tokens of full cache, {cfg.num_layers} layers)"
    )


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
