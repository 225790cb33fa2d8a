"""`nanokv serve`: an OpenAI-compatible HTTP server over the scheduler.

`build_app` makes the FastAPI app of a loaded model and its scheduler; `start_server` runs one
on a background thread (tests, benchmarks); `run_server` is the command line's entry point.
"""

from nanokv.serve.app import ServerState, build_app
from nanokv.serve.server import ServerHandle, ServerThread, start_server

__all__ = ["ServerHandle", "ServerState", "ServerThread", "build_app", "start_server"]
