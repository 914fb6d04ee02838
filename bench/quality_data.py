"""Real chat data, offline, with a held-out set: the questions and answers of FAQ files that Debian documentation
packages install under /usr/share/doc (written by people, not generated), one conversation per question.

    python bench/quality_data.py DIR             # writes DIR/train.jsonl and DIR/eval.jsonl, prints the counts

Each line is `{"messages": [system, user, assistant]}`: the system prompt names the package ("You answer questions
about lsof from its FAQ."), the user turn is the FAQ's question, the assistant turn its answer. Sources and how
each is parsed are in SOURCES; a source missing on this machine is skipped (fewer than MIN_CONVERSATIONS in all is
an error). Only questions that end in "?" are kept (the rest are section titles or statements), a question repeated
(a table of contents before the text) keeps its last, full answer, and questions that only make sense under their
parent ("... on Unix platforms?") are dropped.

Answers are cleaned: tabs expanded, the common indentation removed, decoration lines (----, ____, ****) and the sed
FAQ's change bars dropped, prose paragraphs joined into single lines (indented blocks, code and lists, kept line by
line), runs of blank lines cut to one; an answer longer than MAX_CHARS is cut at the last paragraph boundary before
it (so the longest conversation stays under ~1,024 tokens with SmolLM2's tokenizer). At most PER_SOURCE questions
are taken from a source, evenly spaced over its FAQ (lsof's alone has ~280), and every EVAL_EVERY-th conversation of
the combined list (sources interleaved) is held out. Deterministic for a given set of installed files; stdlib only.
"""

from __future__ import annotations

import gzip
import json
import re
import textwrap
from pathlib import Path

DOC = Path("/usr/share/doc")
# (package, file under /usr/share/doc, regex of a line that starts a question or a section). Numbered FAQs start
# each question with its number at column 0 and indent the answer; the Q/A ones say "Q:" and "A:"; procps puts the
# question at column 0 and indents the answer with a tab.
SOURCES = [
    ("lsof", "lsof/00FAQ.gz", r"\d+(?:\.\d+)+\s+(?=\S)"),
    ("sed", "sed/sedfaq.txt.gz", r"\d+(?:\.\d+)*\.\s+(?=\S)"),
    ("valgrind", "valgrind/FAQ.txt.gz", r"\d+(?:\.\d+)*\.\s+(?=\S)"),  # "3.79.1 have..." in an answer: no match
    ("zlib", "zlib1g-dev/FAQ.gz", r" ?\d+\.\s+(?=\S)"),
    ("xz", "xz-utils/faq.txt.gz", r"Q:\s+"),
    ("base-files", "base-files/FAQ", r"Q\.\s+|\* "),  # "* Other questions:": a section title
    ("procps", "procps/FAQ.gz", r"(?=[A-Z])"),
]
SYSTEM_PROMPT = "You answer questions about {package} from its FAQ."
PER_SOURCE = 60
MAX_CHARS = 2_800  # ~700 tokens of this text; the longest conversation stays under ~1,024
MIN_ANSWER_CHARS = 20
EVAL_EVERY = 8
MIN_CONVERSATIONS = 100
DECORATION = re.compile(r"^\s*([-_=*~])\1{3,}\s*$")
ANSWER_MARK = re.compile(r"^A[:.]\s+")


def read_text(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw.decode("utf-8", errors="replace").expandtabs(8)


def split_entries(text: str, heading: str) -> list[tuple[str, str, list[str]]]:
    """(number, question, answer lines) for each heading line (number: the heading's "4.33." or "Q:"). A table of
    contents repeats the headings (under other numbers, in sed's): the text starts at the last copy of the first
    heading. The question runs from the heading to a blank line, an "A:" line, or an unindented line after one ending
    in "?" (valgrind's answers follow their question at once); the answer from there to the next heading."""
    start = re.compile(heading)
    lines = [re.sub(r"\s+\|$", "", line.rstrip()) for line in text.splitlines()]  # sed's change bars in column 78
    first = next((line for line in lines if start.match(line)), None)
    if first is not None:
        lines = lines[len(lines) - 1 - lines[::-1].index(first):]
    entries: list[tuple[str, list[str], list[str]]] = []
    asking = False  # still reading the question's lines
    for line in lines:
        if DECORATION.match(line):
            continue
        if match := start.match(line):
            entries.append((match.group().strip(), [line[match.end():]], []))
            asking = True
            continue
        if not entries:
            continue
        _, question, answer = entries[-1]
        if asking and line.strip() and not ANSWER_MARK.match(line) and (line[0] == " " or not question[-1].endswith("?")):
            question.append(line.strip())
            continue
        asking = False
        if answer or line.strip():
            answer.append(ANSWER_MARK.sub(lambda m: " " * len(m.group()), line))  # xz indents the rest under "A:  "
    return [(number, " ".join(" ".join(q).split()), a) for number, q, a in entries]


def clean_answer(lines: list[str]) -> str:
    """Dedented; prose paragraphs joined into one line each, indented blocks kept; cut at a paragraph boundary."""
    text = textwrap.dedent("\n".join(lines)).strip()  # strip: base-files' "A. " indents only the first line
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        block_lines = block.rstrip().split("\n")
        if all(not line.startswith(" ") for line in block_lines):  # prose: its wrapping is the file's, not meaning
            paragraphs.append(" ".join(" ".join(block_lines).split()))
        else:
            paragraphs.append(block.rstrip())
    answer = "\n\n".join(p for p in paragraphs if p.strip())
    if len(answer) > MAX_CHARS:
        cut = answer.rfind("\n\n", 0, MAX_CHARS)
        answer = answer[:cut] if cut > 0 else answer[:answer.rfind("\n", 0, MAX_CHARS)]
    return answer.strip()


def faq(package: str, path: Path, heading: str) -> list[tuple[str, str]]:
    """(question, answer) pairs of one FAQ file, in its order, at most PER_SOURCE, evenly spaced."""
    found: dict[str, tuple[str, str]] = {}
    for number, question, lines in split_entries(read_text(path), heading):
        if not question.endswith("?") or question.startswith("..."):
            continue
        answer = clean_answer(lines)
        if len(answer) >= MIN_ANSWER_CHARS:
            key = number if any(c.isdigit() for c in number) else question
            found.pop(key, None)  # a table of contents came first: the text's entry, last, wins and keeps its place
            found[key] = (question, answer)
    pairs = list(found.values())
    if len(pairs) > PER_SOURCE:
        pairs = [pairs[(i * len(pairs)) // PER_SOURCE] for i in range(PER_SOURCE)]
    return pairs


def conversations() -> list[dict]:
    """Every source's conversations, interleaved (one of each in turn) so that any slice covers every package."""
    per_source = []
    for package, name, heading in SOURCES:
        path = DOC / name
        if path.exists():
            per_source.append([
                {"messages": [
                    {"role": "system", "content": SYSTEM_PROMPT.format(package=package)},
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]}
                for question, answer in faq(package, path, heading)
            ])
    interleaved = [c for i in range(max(map(len, per_source), default=0)) for s in per_source if i < len(s) for c in [s[i]]]
    if len(interleaved) < MIN_CONVERSATIONS:
        raise SystemExit(f"only {len(interleaved)} FAQ conversations found under {DOC} (need {MIN_CONVERSATIONS}): "
                         f"install the documentation packages of {', '.join(p for p, _, _ in SOURCES)}")
    return interleaved


def write_quality_data(out_dir) -> tuple[Path, Path]:
    """Write out_dir/train.jsonl and out_dir/eval.jsonl (every EVAL_EVERY-th conversation); returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chats = conversations()
    split = {"train": [c for i, c in enumerate(chats) if i % EVAL_EVERY != EVAL_EVERY - 1],
             "eval": [c for i, c in enumerate(chats) if i % EVAL_EVERY == EVAL_EVERY - 1]}
    paths = []
    for name, records in split.items():
        path = out_dir / f"{name}.jsonl"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        tmp.replace(path)
        paths.append(path)
    return paths[0], paths[1]


if __name__ == "__main__":
    import argparse
    import collections

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, help="the directory to write train.jsonl and eval.jsonl to")
    args = ap.parse_args()
    for path in write_quality_data(args.out):
        records = [json.loads(line) for line in path.read_text().splitlines()]
        packages = collections.Counter(r["messages"][0]["content"].split()[4] for r in records)
        print(f"{path}: {len(records)} conversations ({', '.join(f'{p} {n}' for p, n in packages.items())})")
