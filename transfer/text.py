"""English prose every machine has: the docstrings and comments of the Python standard
library's own modules, split *by file* into training and held-out sets (a file's text is in
one set only), so held-out sentences come from modules the transfer never saw."""
from __future__ import annotations

import ast
import io
import os
import random
import re
import sysconfig
import tokenize
import zlib

HELDOUT_PERCENT = 20


def stdlib_files() -> list[str]:
    """The top-level .py files of the standard library (tests and site-packages left out),
    sorted, paths relative to the stdlib folder."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "test", "tests",
                                                               "idle_test", "__pycache__"))
        out += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                if f.endswith(".py")]
    return sorted(out)


def is_heldout(relpath: str) -> bool:
    """A fixed 20% of files by a hash of their path (the same on every machine)."""
    return zlib.crc32(relpath.encode()) % 100 < HELDOUT_PERCENT


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def file_passages(path: str) -> list[str]:
    """Docstrings (whole) and runs of consecutive comment lines (joined) of one file."""
    try:
        source = open(path, encoding="utf-8").read()
        tree = ast.parse(source)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return []
    out = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc:
                out.append(_clean(doc))
    run, last = [], -2
    try:
        for tok in tokenize.generate_tokens(io.StringIO(source).readline):
            if tok.type == tokenize.COMMENT:
                body = tok.string.lstrip("#").strip()
                if tok.start[0] != last + 1 and run:
                    out.append(_clean(" ".join(run)))
                    run = []
                if body and not body.startswith("!"):
                    run.append(body)
                last = tok.start[0]
    except (tokenize.TokenError, IndentationError, SyntaxError):
        pass
    if run:
        out.append(_clean(" ".join(run)))
    return [p for p in out if len(p.split()) >= 4 and re.search(r"[a-zA-Z]{3}", p)]


def passages(heldout: bool) -> list[str]:
    """All passages of the training (False) or held-out (True) files."""
    root = sysconfig.get_paths()["stdlib"]
    return [p for f in stdlib_files() if is_heldout(f) == heldout
            for p in file_passages(os.path.join(root, f))]


def sentences(heldout: bool, count: int, seed: int = 0, min_words: int = 6,
              max_words: int = 40) -> list[str]:
    """``count`` distinct English-looking sentences (``min_words`` to ``max_words`` words,
    mostly letters) drawn with ``seed`` from the passages of one split."""
    seen, pool = set(), []
    for p in passages(heldout):
        for s in re.split(r"(?<=[.!?])\s+", p):
            words = s.split()
            letters = sum(c.isalpha() or c.isspace() for c in s) / max(1, len(s))
            if min_words <= len(words) <= max_words and letters > 0.85 and s not in seen:
                seen.add(s)
                pool.append(s)
    random.Random(seed).shuffle(pool)
    return pool[:count]
