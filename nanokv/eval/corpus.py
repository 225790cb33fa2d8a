"""Real text that ships with Python and the installed packages: no download, listed in the output.

Three kinds of text, each in a fixed order so that a case id always selects the same text on the
same installation:

- prose: the standard library's LICENSE.txt, the Python reference manual bundled as
  `pydoc_data.topics`, then the license files and long descriptions of the installed
  distributions (sorted by name) -- split into prose-looking sentences for haystacks;
- docs: the reference manual topics as one long text (fidelity on natural text);
- code: long Python files of the standard library (fidelity on code, code completion).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
import sysconfig
from dataclasses import dataclass
from functools import cache
from pathlib import Path

_LICENSE_NAME = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_MIN_CODE_CHARS = 40_000


@dataclass(frozen=True)
class Sentence:
    text: str
    source: str  # where it came from, e.g. "stdlib/LICENSE.txt"


@dataclass(frozen=True)
class Document:
    name: str  # e.g. "stdlib/argparse.py"
    text: str


def stdlib_dir() -> Path:
    """The standard library directory of the running Python."""
    return Path(sysconfig.get_paths()["stdlib"])


@cache
def prose_sentences() -> tuple[Sentence, ...]:
    """Every prose-looking sentence of the installed texts, in source order, each once (license
    texts repeat each other)."""
    sentences, seen = [], set()
    for name, text in _prose_sources():
        for sentence in split_sentences(text):
            if sentence not in seen:
                seen.add(sentence)
                sentences.append(Sentence(sentence, name))
    if not sentences:
        raise ValueError("no prose found in the standard library or site-packages for a haystack")
    return tuple(sentences)


def corpus_fingerprint() -> str:
    """A short hash of the prose corpus (results made with another corpus are not comparable)."""
    digest = hashlib.sha256()
    for sentence in prose_sentences():
        digest.update(sentence.text.encode())
    return digest.hexdigest()[:12]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text` that read as prose: 5 to 60 words, mostly letters, one line."""
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if _is_prose(s)]


def _is_prose(sentence: str) -> bool:
    words = sentence.split()
    if not 5 <= len(words) <= 60 or sentence[-1] not in ".!?":
        return False
    letters = sum(c.isalpha() or c == " " for c in sentence)
    return letters >= 0.85 * len(sentence) and not re.search(r"\d{5,}", sentence)


def _prose_sources() -> list[tuple[str, str]]:
    """(name, text) of the prose sources, stdlib first (stable for a Python version)."""
    sources = []
    license_file = stdlib_dir() / "LICENSE.txt"
    if license_file.is_file():
        sources.append(("stdlib/LICENSE.txt", license_file.read_text(errors="replace")))
    sources += [(f"stdlib/pydoc_data.topics[{k}]", t) for k, t in _topics()]
    for dist in sorted(importlib.metadata.distributions(), key=_dist_name):
        if _dist_name(dist) != "nanokv":  # its description is this README, which keeps changing
            sources += _distribution_texts(dist)
    return sources


def _topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        return []
    return sorted(topics.items())


def _dist_name(dist: importlib.metadata.Distribution) -> str:
    return (dist.metadata["Name"] or "").lower()


def _distribution_texts(dist: importlib.metadata.Distribution) -> list[tuple[str, str]]:
    """A distribution's license files (inside its .dist-info) and long description."""
    name = dist.metadata["Name"] or "?"
    texts = []
    for file in sorted(dist.files or [], key=str):
        in_info = file.parts and file.parts[0].endswith(".dist-info")
        if in_info and _LICENSE_NAME.match(file.name):
            try:
                text = Path(dist.locate_file(file)).read_text(errors="replace")
            except OSError:
                continue
            texts.append((f"site-packages/{file}", text))
    description = dist.metadata.get_payload() or ""
    if description.strip():
        texts.append((f"site-packages/{name} (METADATA description)", description))
    return texts


@cache
def docs_text() -> Document:
    """The Python reference manual bundled with the standard library, as one text."""
    topics = _topics()
    if not topics:
        raise ValueError("pydoc_data.topics is missing from this Python: no docs text")
    return Document("stdlib/pydoc_data.topics", "\n\n".join(text for _, text in topics))


@cache
def code_files() -> tuple[Document, ...]:
    """Long standard-library Python files (>= 40k characters), sorted by name."""
    files = []
    for path in sorted(stdlib_dir().glob("*.py")):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        if len(text) >= _MIN_CODE_CHARS:
            files.append(Document(f"stdlib/{path.name}", text))
    if not files:
        raise ValueError(f"no long Python files found in {stdlib_dir()}")
    return tuple(files)
