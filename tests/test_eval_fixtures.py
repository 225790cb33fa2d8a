"""Shared fixtures of the eval tests: a tiny random Llama with a context long enough for
haystacks (the tiny tokenizer is nearly byte-level, so a prompt needs ~1 token a character).

Test modules import the fixture functions (`from test_eval_fixtures import ...`); the checkpoint
is written once per session however many modules use it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import nanokv
from nanokv.tokenizer import Tokenizer

_MADE: dict[str, object] = {}


def _checkpoint(tmp_path_factory) -> Path:
    """tiny_models' Llama with max_position_embeddings 4096, written once a session."""
    if "dir" not in _MADE:
        from tiny_models import llama_config, save_checkpoint
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        config = llama_config(max_position_embeddings=4096)
        config._attn_implementation = "eager"
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
        with torch.no_grad():  # as tiny_models.make_hf_model: wide enough that layers matter
            for name, param in model.named_parameters():
                if "norm" not in name:
                    param.normal_(0, 0.2)
        path = tmp_path_factory.mktemp("tiny-llama-long")
        _MADE["dir"] = save_checkpoint(model.float().eval(), path)
    return _MADE["dir"]


@pytest.fixture(scope="session", name="long_tiny_dir")
def long_tiny_dir_fixture(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory)


@pytest.fixture(scope="session", name="long_tiny_llm")
def long_tiny_llm_fixture(tmp_path_factory) -> nanokv.LLM:
    if "llm" not in _MADE:
        _MADE["llm"] = nanokv.LLM(_checkpoint(tmp_path_factory))
    return _MADE["llm"]


@pytest.fixture(scope="session", name="tiny_tokenizer")
def tiny_tokenizer_fixture(tmp_path_factory) -> Tokenizer:
    return Tokenizer(_checkpoint(tmp_path_factory))
