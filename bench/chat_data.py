"""Real chat data, offline: questions about Python standard-library functions and classes, answered with their
own docstrings (real English technical text, written by people), under one fixed system prompt.

    python bench/chat_data.py out.jsonl          # 175 conversations (~49k tokens with SmolLM2's tokenizer)
    python bench/chat_data.py out.jsonl --n 600  # more of them

Each line is `{"messages": [system, user, assistant]}`: the user asks about `module.name` ("What does `json.dumps`
do?" and a few other phrasings), the assistant answers with `inspect.getdoc` of it. Deterministic for a given
Python version (docstrings change between releases): a fixed, sorted list of modules, their public functions,
classes and methods in sorted order, docstrings shorter than MIN_CHARS (or MIN_WORDS words) skipped, answers cut at
a line boundary before MAX_CHARS (so the longest conversation is ~1,000 tokens), and an evenly spaced fixed
selection of n of the candidates. Only stdlib is imported; no file or network is read.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys
import warnings
from pathlib import Path

SYSTEM_PROMPT = (
    "You are a concise assistant for Python programmers. Answer questions about the Python standard library "
    "accurately, in the style of its reference documentation."
)
QUESTIONS = (
    "What does `{name}` do?",
    "Can you explain `{name}`?",
    "How do I use `{name}` in Python?",
    "What is `{name}` for?",
    "Describe `{name}` from the standard library.",
)
MIN_CHARS = 450  # skip empty, one-line ("Return self.") and short docstrings: about 5 lines or more
MIN_WORDS = 25
MAX_CHARS = 3_600  # an answer's cap: ~950 tokens with a 49k BPE, so the longest conversation is ~1,000 tokens

# Pure-Python and C modules with no import side effects (no GUI, no `this`/`antigravity`), sorted.
MODULES = sorted([
    "abc", "argparse", "array", "ast", "asyncio", "base64", "binascii", "bisect", "bz2", "calendar", "cmath",
    "codecs", "collections", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email.message", "email.utils", "enum", "filecmp", "fileinput",
    "fnmatch", "fractions", "ftplib", "functools", "gc", "getopt", "gettext", "glob", "graphlib", "gzip",
    "hashlib", "heapq", "hmac", "html", "html.parser", "http.client", "http.cookies", "imaplib", "importlib",
    "inspect", "io", "ipaddress", "itertools", "json", "keyword", "linecache", "locale", "logging", "lzma",
    "mailbox", "math", "mimetypes", "multiprocessing", "netrc", "numbers", "operator", "os", "os.path", "pathlib",
    "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "profile", "pstats", "queue", "quopri",
    "random", "re", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "signal", "smtplib",
    "socket", "socketserver", "sqlite3", "ssl", "stat", "statistics", "string", "struct", "subprocess",
    "sysconfig", "tarfile", "tempfile", "textwrap", "threading", "time", "timeit", "token", "tokenize",
    "trace", "traceback", "tracemalloc", "types", "typing", "unicodedata", "urllib.parse", "urllib.request",
    "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zlib",
])


def _defined_in(obj, module) -> bool:
    """Defined by this module (or its C accelerator, e.g. `_json` behind `json`), not imported into it."""
    owner = getattr(obj, "__module__", None) or ""
    name = module.__name__
    return owner == name or owner.lstrip("_") == name.rsplit(".", 1)[-1] or owner == "_" + name


def _clean(doc: str) -> str:
    """Cut at a line boundary before MAX_CHARS (a docstring's paragraphs and lists are line-based)."""
    doc = doc.strip()
    if len(doc) <= MAX_CHARS:
        return doc
    cut = doc.rfind("\n", 0, MAX_CHARS)
    if cut < MAX_CHARS // 2:
        cut = doc.rfind(" ", 0, MAX_CHARS)
    return doc[:cut].rstrip()


def candidates() -> list[tuple[str, str]]:
    """(qualified name, answer) of every documented public function, class and method, in sorted order."""
    found: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for modname in MODULES:
            try:
                module = importlib.import_module(modname)
            except ImportError:  # a module this Python was built without (e.g. no _lzma)
                continue
            for attr in sorted(dir(module)):
                if attr.startswith("_"):
                    continue
                obj = getattr(module, attr, None)
                if not (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                    continue
                if not _defined_in(obj, module):
                    continue
                items = [(f"{modname}.{attr}", obj)]
                if inspect.isclass(obj):
                    items += [
                        (f"{modname}.{attr}.{m}", member) for m, member in sorted(vars(obj).items())
                        if not m.startswith("_") and callable(member)
                    ]
                for name, member in items:
                    doc = inspect.getdoc(member) or ""
                    if len(doc) < MIN_CHARS or len(doc.split()) < MIN_WORDS:
                        continue
                    found.setdefault(name, _clean(doc))
    return sorted(found.items())


def conversations(n: int = 175) -> list[dict]:
    """n conversations, evenly spaced over the sorted candidates (so every part of the stdlib is sampled)."""
    pool = candidates()
    if n > len(pool):
        raise ValueError(f"only {len(pool)} documented names on Python {sys.version.split()[0]}; asked for {n}")
    picked = [pool[(i * len(pool)) // n] for i in range(n)]
    return [
        {"messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)].format(name=name)},
            {"role": "assistant", "content": answer},
        ]}
        for i, (name, answer) in enumerate(picked)
    ]


def write_chat_data(path, n: int = 175) -> Path:
    """Write n conversations as chat JSONL (`{"messages": [...]}` per line) to path; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for record in conversations(n):
            f.write(json.dumps(record) + "\n")
    tmp.replace(path)
    return path


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the JSONL file to write")
    ap.add_argument("--n", type=int, default=175, help="conversations (default 175)")
    args = ap.parse_args()
    print(write_chat_data(args.out, args.n))
