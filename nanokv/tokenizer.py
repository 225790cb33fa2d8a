"""Tokenizer of a model directory (`tokenizer.json` or sentencepiece `tokenizer.model`) and its
chat template, rendered in jinja2's sandbox as transformers does. A template the sandbox refuses,
or one that does not compile or render, is a TokenizerError naming the file that holds it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import Template
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TokenizerError(ValueError):
    """The tokenizer files of a model directory are missing or unusable."""


class _TemplateRaised(TemplateError):
    """The template's own `raise_exception(...)`: it refuses the conversation it was given."""


# What rendering a model's template can raise: jinja2's errors (the sandbox's SecurityError among
# them) and the Python errors of the template's own expressions ({{ 1 / 0 }}, {{ 1 + 'a' }}).
_RENDER_ERRORS = (TemplateError, ArithmeticError, LookupError, TypeError, ValueError)


class Tokenizer:
    """encode / decode / chat-template rendering with one interface for both file formats."""

    def __init__(self, model_dir: Path) -> None:
        self.config = _read_tokenizer_config(model_dir)
        self.config_path = model_dir / "tokenizer_config.json"
        if (model_dir / "tokenizer.json").is_file():
            self._backend = _HFTokenizer(model_dir / "tokenizer.json")
        elif (model_dir / "tokenizer.model").is_file():
            self._backend = _SentencePieceTokenizer(model_dir / "tokenizer.model", self.config)
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {model_dir}")
        self.chat_template = _chat_template(self.config.get("chat_template"))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids)

    def token_id(self, token: str | dict | None) -> int | None:
        if isinstance(token, dict):
            token = token.get("content")
        return None if token is None else self._backend.token_to_id(token)

    @property
    def eos_token_ids(self) -> set[int]:
        eos = self.token_id(self.config.get("eos_token"))
        return set() if eos is None else {eos}

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for `messages` with the generation prompt appended."""
        template = self._compiled_template()
        special = {
            key: _token_text(self.config.get(key))
            for key in ("bos_token", "eos_token", "pad_token", "unk_token")
        }
        try:
            return template.render(messages=messages, add_generation_prompt=True, **special)
        except _RENDER_ERRORS as exc:
            raise _template_rejected(self.config_path, exc) from exc

    def _compiled_template(self) -> Template:
        """The chat template compiled in jinja2's sandbox, so that a template from a downloaded
        model cannot reach Python objects it was not given. Compiled on use: --raw never needs
        it, so a broken template only stops the runs that would render it."""
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template; pass the prompt raw")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        try:
            return env.from_string(self.chat_template)
        except TemplateError as exc:  # a syntax error, or a filter or test that is unknown
            raise _template_rejected(self.config_path, exc) from exc

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of the rendered conversation; the template already holds special tokens."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)


def _raise_template_error(message: str) -> None:
    raise _TemplateRaised(message)


def _template_rejected(path: Path, exc: Exception) -> TokenizerError:
    """One line that names the file holding the template and says why it failed."""
    if isinstance(exc, SecurityError):
        reason = f"the jinja2 sandbox refused unsafe code: {exc}"
    elif isinstance(exc, TemplateSyntaxError):
        reason = f"invalid jinja2 at line {exc.lineno} of the template: {exc.message}"
    elif isinstance(exc, _TemplateRaised):
        reason = f"the template refused the conversation: {exc}"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return TokenizerError(f"{path}: chat template rejected: {reason}")


def _token_text(token: Any) -> str | None:
    return token.get("content") if isinstance(token, dict) else token


def _read_tokenizer_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON: {exc}") from exc


def _chat_template(value: Any) -> str | None:
    """A template string, or the one named 'default' when the config holds a list."""
    if isinstance(value, list):
        named = {item.get("name"): item.get("template") for item in value}
        return named.get("default")
    return value


class _HFTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception
            raise TokenizerError(f"cannot read {path}: {exc}") from exc

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)


class _SentencePieceTokenizer:
    def __init__(self, path: Path, config: dict[str, Any]) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot read {path}: {exc}") from exc
        self._add_bos = config.get("add_bos_token", True)
        self._add_eos = config.get("add_eos_token", False)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        ids = self._sp.EncodeAsIds(text)
        if add_special_tokens and self._add_bos and self._sp.bos_id() >= 0:
            ids = [self._sp.bos_id(), *ids]
        if add_special_tokens and self._add_eos and self._sp.eos_id() >= 0:
            ids = [*ids, self._sp.eos_id()]
        return ids

    def decode(self, ids: list[int]) -> str:
        return self._sp.DecodeIds(ids)

    def token_to_id(self, token: str) -> int | None:
        piece_id = self._sp.PieceToId(token)
        return (
            None
            if piece_id == self._sp.unk_id() and token != self._sp.IdToPiece(piece_id)
            else piece_id
        )
