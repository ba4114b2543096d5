"""Documents as ``str`` iterators: the embedded stdlib corpus, plain-text files, JSON Lines.

Every source yields one document per file (text), per line (jsonl) or per file/topic (stdlib),
in a deterministic order, skipping empty documents (an empty ``__init__.py`` would only add a
``[BOS][EOS]`` pair that teaches nothing). ``data.max_bytes`` caps the UTF-8 bytes yielded: the
document that crosses the cap is cut there and reading stops, so later files are never opened.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import sysconfig
from pathlib import Path
from typing import Iterable, Iterator, Optional

from seqpar.config import DataConfig
from seqpar.errors import ConfigError

# Directories of the stdlib tree left out of the embedded corpus, and why:
#  site-packages: third-party code installed into this interpreter; not "the stdlib", and its size
#    (often 100+ MB of torch/numpy) would make the corpus differ from machine to machine.
#  test, tests, idle_test: ~17 MB dominated by generated data tables and deliberately malformed
#    sources (bad encodings, syntax-error fixtures); leaving them out keeps the corpus ~15 MB of
#    ordinary code, which builds in a few seconds.
#  pydoc_data: its topics.py is the dict literal we add below as separate English documents.
#  __pycache__: compiled files only.
_STDLIB_SKIP_DIRS = frozenset({"site-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"})


def stdlib_root() -> Path:
    """The running interpreter's standard-library directory (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Optional[Path] = None) -> list[Path]:
    """Every ``.py`` file under the stdlib root, in sorted path order, minus the skipped dirs."""
    root = stdlib_root() if root is None else root
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP_DIRS]
        files.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    # Sort the full list (os.walk order depends on the filesystem) so every machine agrees.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_documents() -> Iterator[str]:
    """Yield the stdlib corpus: each ``.py`` file, then each ``pydoc_data`` topic (~465k chars of English)."""
    for path in stdlib_files():
        # errors="replace": a handful of stdlib files are latin-1; one odd byte must not stop training.
        yield path.read_bytes().decode("utf-8", errors="replace")
    from pydoc_data.topics import topics  # imported lazily: ~0.8 MB module

    for key in sorted(topics):
        yield topics[key]


def resolve_paths(patterns: Iterable[str]) -> list[Path]:
    """Expand ``data.paths`` entries (files or globs, ``~`` allowed) into existing files, in order.

    Raises:
        FileNotFoundError: an entry names a missing file, a directory, or a glob matching nothing.
    """
    out: list[Path] = []
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        if glob.has_magic(pattern):
            matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise FileNotFoundError(
                    f"data.paths entry {pattern!r} matches no file; fix the glob or the working directory."
                )
        elif os.path.isdir(pattern):
            raise FileNotFoundError(
                f"data.paths entry {pattern!r} is a directory; use a glob such as '{pattern}/**/*.txt'."
            )
        elif not os.path.isfile(pattern):
            raise FileNotFoundError(f"data.paths entry {pattern!r} does not exist; fix the path.")
        else:
            matches = [pattern]
        out.extend(Path(m) for m in matches)
    # Keep the first occurrence: overlapping globs must not duplicate a document.
    return list(dict.fromkeys(out))


# A text file where more than this fraction of the characters are undecodable bytes (U+FFFD) or control
# characters other than whitespace is binary, not text (random bytes: ~60%; latin-1 prose: a few %).
MAX_GARBAGE_FRACTION = 0.2
_WHITESPACE_CONTROLS = frozenset("\t\n\r\f\v")


def garbage_fraction(text: str) -> float:
    """The fraction of ``text``'s characters that are U+FFFD (undecodable bytes) or non-whitespace controls."""
    if not text:
        return 0.0
    bad = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in _WHITESPACE_CONTROLS) or c == "\x7f")
    return bad / len(text)


def check_text(text: str, where: str) -> None:
    """Raise ConfigError when ``text`` (a document read from ``where``) looks like binary data."""
    frac = garbage_fraction(text[:1_000_000])  # a prefix decides: the check must not cost a second read
    if frac > MAX_GARBAGE_FRACTION:
        raise ConfigError(f"data.paths file {where!r} does not look like text: {frac:.0%} of its characters are "
                          "undecodable bytes or control characters (more than "
                          f"{MAX_GARBAGE_FRACTION:.0%}); give UTF-8 text files, or remove it from data.paths.")


def text_documents(paths: Iterable[Path]) -> Iterator[str]:
    """Yield each file as one document (UTF-8; undecodable bytes become U+FFFD).

    Raises:
        ConfigError: a file that is binary rather than text (:func:`check_text`).
    """
    for path in paths:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
        check_text(text, str(path))
        yield text


def jsonl_documents(paths: Iterable[Path], field: str = "text") -> Iterator[str]:
    """Yield ``obj[field]`` for each non-blank line of each JSON Lines file.

    Raises:
        ConfigError (a ValueError): a line is not a JSON object with a string ``field``; names file and line.
    """
    for path in paths:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ConfigError(
                        f"data.paths file {str(path)!r} line {lineno} is not valid JSON ({e.msg}); "
                        "fix or remove that line."
                    ) from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise ConfigError(
                        f"data.paths file {str(path)!r} line {lineno} has no string field {field!r}; "
                        "set data.jsonl_field to the key that holds the document text."
                    )
                yield obj[field]


def cap_bytes(documents: Iterable[str], max_bytes: Optional[int]) -> Iterator[str]:
    """Yield non-empty documents until ``max_bytes`` UTF-8 bytes are read; cut the last one there."""
    total = 0
    for doc in documents:
        if not doc:
            continue
        if max_bytes is None:
            yield doc
            continue
        raw = doc.encode("utf-8")
        if total + len(raw) >= max_bytes:
            # errors="ignore" drops a character split by the cut instead of inventing U+FFFD.
            tail = raw[: max_bytes - total].decode("utf-8", errors="ignore")
            if tail:
                yield tail
            return
        total += len(raw)
        yield doc


def iter_documents(cfg: DataConfig) -> Iterator[str]:
    """Documents of ``cfg.source`` in deterministic order, capped at ``cfg.max_bytes``.

    Paths are resolved now (not on first ``next``), so a missing file fails at the call site.

    Raises:
        FileNotFoundError: see :func:`resolve_paths`; ValueError: a bad jsonl line (on iteration).
    """
    if cfg.source == "stdlib":
        docs: Iterable[str] = stdlib_documents()
    elif cfg.source == "text":
        docs = text_documents(resolve_paths(cfg.paths))
    else:
        docs = jsonl_documents(resolve_paths(cfg.paths), cfg.jsonl_field)
    return cap_bytes(docs, cfg.max_bytes)


def corpus_fingerprint(cfg: DataConfig) -> str:
    """A short hash naming the corpus ``cfg`` reads (for cache keys); cheap: stats files, reads none.

    stdlib: Python version + stdlib path; text/jsonl: each file's path, size and mtime.
    """
    parts: list[str] = [cfg.source, str(cfg.max_bytes)]
    if cfg.source == "stdlib":
        parts += [sys.version, str(stdlib_root())]
    else:
        parts.append(cfg.jsonl_field if cfg.source == "jsonl" else "")
        for p in resolve_paths(cfg.paths):
            st = p.stat()
            parts.append(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()[:16]
