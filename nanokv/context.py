"""A compressed context: prefill and compress a document once, then ask it many questions.

This is kvpress's default setting (the question is not seen by the compression) and what a user
needs to query one long document repeatedly: the compressed arena is kept, and each question
extends a copy of it. With a chat template the document sits in the user message and the
question follows it inside the same message (kvpress's separator split)."""

from __future__ import annotations

from dataclasses import dataclass

from nanokv.engine import DecodeState, InputError
from nanokv.tokenizer import Tokenizer

_MARK = "\n\u2063nanokv-question\u2063"


@dataclass
class CompressedContext:
    """What `LLM.compress` returns; pass it as `context=` to `LLM.generate` / `LLM.chat`."""

    state: DecodeState  # the compressed arena after the document, before any question
    token_ids: list[int]  # the document as prefilled (template prefix included)
    question_suffix: str  # text that follows each question (the chat template's tail)
    reserve: int  # slots kept free for question + answer tokens
    policy: str

    def question_ids(
        self, tokenizer: Tokenizer, question: str, answer_prefix: str = ""
    ) -> list[int]:
        """Tokens that follow the document: the question, the template's tail, and an optional
        primed start of the answer."""
        text = question + self.question_suffix + answer_prefix
        ids = tokenizer.encode(text, add_special_tokens=False)
        if not question.strip():
            raise InputError("the question is empty: give the text to ask")
        return ids


def split_context(tokenizer: Tokenizer, text: str, chat: bool) -> tuple[list[int], str]:
    """(document token ids, question suffix) for `text`, with or without the chat template."""
    if not text.strip():
        raise InputError("the context is empty: give the document to compress")
    if not chat or tokenizer.chat_template is None:
        return tokenizer.encode(text), ""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text + _MARK}])
    if rendered.count(_MARK) != 1:
        raise InputError("the chat template does not keep the user message verbatim")
    prefix, suffix = rendered.split(_MARK)
    return tokenizer.encode(prefix, add_special_tokens=False), suffix
