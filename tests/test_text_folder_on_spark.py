"""Spark prepares exactly the documents in-process prep does: names starting with `_` included, though Spark's own
file listing drops them (even when named), and the same files skipped."""

import pytest

from test_prepare_spark import assert_same_as_in_process, sail  # noqa: F401 (sail is a fixture)
from test_sources import write_docs

pytestmark = pytest.mark.slow


def test_names_starting_with_an_underscore_are_documents_on_spark_too(home, sail, tokenizer):  # noqa: F811
    write_docs(home / "volumes" / "main" / "raw" / "docs", {
        "_thread.txt": "A thread. " * 30, "__future__.txt": "The future. " * 20, "_sub/x.txt": "In _sub. " * 10,
        "plain.txt": "Plain. " * 5, ".hidden.txt": "hidden", ".git/y.txt": "hidden", "notes.md": "not text",
    })
    stats = assert_same_as_in_process("/Volumes/main/raw/docs", "CONTINUED_PRETRAIN", sail, tokenizer)
    assert stats.examples == 4
    assert stats.skipped_files == {"hidden file": 1, "in a hidden folder": 1, "not a .txt file": 1}
