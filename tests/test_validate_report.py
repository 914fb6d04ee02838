"""`tessera validate`: the data report before training, its exit codes and its JSON."""

import json
import os
import subprocess
import sys

import pytest

from tasks.validate import histogram_png
from tessera import foundation_model as fm

from conftest import chat, write_jsonl


def tessera(*args):
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], capture_output=True, text=True, env=os.environ.copy())


@pytest.fixture
def chat_file(home):
    return write_jsonl(home / "chat.jsonl", [chat(f"question number {i}", f"answer number {i}" * (1 + i % 3)) for i in range(30)])


def test_report_counts_tokens_and_estimates_the_bill(chat_file):
    report = fm.validate_data(str(chat_file), model="tessera/tiny-chat", training_duration="2ep")
    assert report.valid and report.examples == 30
    t = report.tokens_per_example
    assert 0 < t.min <= t.p50 <= t.p95 <= t.max and t.min <= t.mean <= t.max
    assert 0 < report.trainable_tokens < report.tokens_per_epoch
    assert report.billed_tokens == 2 * report.tokens_per_epoch
    assert report.optimizer_steps >= 2 and report.epochs == 2
    assert sum(count for _, _, count in report.length_histogram) == 30
    assert report.packed_rows >= 1 and 0 < report.packing_fill <= 1


def test_tokens_duration_bills_exactly_that_many(chat_file):
    report = fm.validate_data(str(chat_file), model="tessera/tiny-chat", training_duration="10_000tok")
    assert report.billed_tokens == 10_000


def test_warnings_for_tiny_data_and_many_epochs(chat_file):
    report = fm.validate_data(str(chat_file), model="tessera/tiny-chat", training_duration="10ep")
    assert any("less than one full context length" in w for w in report.warnings) == (report.tokens_per_epoch < 512)
    assert any("more than 4" in w for w in report.warnings)
    quiet = fm.validate_data(str(chat_file), model="tessera/tiny-chat", training_duration="1ep", context_length=16)
    assert not any("more than 4" in w for w in quiet.warnings)
    assert quiet.truncated > 0 and any("truncated" in w for w in quiet.warnings)


def test_cli_prints_the_report_and_exits_0_for_valid_data(chat_file):
    result = tessera("validate", str(chat_file), "--model", "tessera/tiny-chat", "--training-duration", "3ep")
    assert result.returncode == 0, result.stderr
    assert "examples: 30" in result.stdout
    assert "tokens per example: min" in result.stdout
    assert "optimizer steps" in result.stdout


def test_cli_json_parses_and_matches_the_sdk(chat_file):
    result = tessera("validate", str(chat_file), "--model", "tessera/tiny-chat", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    sdk = fm.validate_data(str(chat_file), model="tessera/tiny-chat")
    assert report["tokens_per_epoch"] == sdk.tokens_per_epoch
    assert report["valid"] is True


def test_cli_exits_1_for_invalid_data_listing_each_error(home):
    path = write_jsonl(home / "bad.jsonl", [chat("q", "a"), "not json", {"messages": [{"role": "user", "content": "q"}]}])
    result = tessera("validate", str(path), "--model", "tessera/tiny-chat", "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["valid"] is False and report["error_count"] == 2
    assert report["errors"][0].startswith(f"{path}:2: not valid JSON")
    assert report["errors"][1].startswith(f"{path}:3:")


def test_cli_exits_2_for_usage_errors(chat_file):
    bad_duration = tessera("validate", str(chat_file), "--model", "tessera/tiny-chat", "--training-duration", "forever")
    assert bad_duration.returncode == 2 and "training_duration" in bad_duration.stderr
    too_long = tessera("validate", str(chat_file), "--model", "tessera/tiny-chat", "--context-length", "100000")
    assert too_long.returncode == 2 and "maximum of 512" in too_long.stderr
    no_model = tessera("validate", str(chat_file))
    assert no_model.returncode == 2
    for r in (bad_duration, too_long):
        assert "Traceback" not in r.stderr


def test_histogram_png(chat_file, tmp_path):
    report = fm.validate_data(str(chat_file), model="tessera/tiny-chat")
    png = histogram_png(report, tmp_path / "h.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def bad_inputs(home) -> dict:
    """Each class of bad input (issue: every bad input gets a clear error), as CLI arguments."""
    volume = home / "volumes" / "main" / "raw" / "files"
    volume.mkdir(parents=True)
    (volume / "latin1.jsonl").write_bytes(json.dumps(chat("q", "a")).encode() + b'\n{"messages": "caf\xe9"}\n')
    write_jsonl(volume / "nested.jsonl", [{"messages": [[{"role": "user", "content": "q"}]]}])
    write_jsonl(volume / "typed.jsonl", [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 7}]}])
    write_jsonl(volume / "array.jsonl", [[1, 2]])
    (volume / "empty.jsonl").touch()
    (volume / "chat.csv").write_text("q,a\n")
    write_jsonl(home / "ok.jsonl", [chat("q", "a")])
    v = "/Volumes/main/raw/files"
    return {
        "not UTF-8": (["validate", f"{v}/latin1.jsonl"], 1, f"{v}/latin1.jsonl:2: not valid UTF-8 (byte 17)"),
        "not an object": (["validate", f"{v}/array.jsonl"], 1, f"{v}/array.jsonl:1: expected a JSON object, got list"),
        "extra-nested": (["validate", f"{v}/nested.jsonl"], 1, f"{v}/nested.jsonl:1: messages[0]: expected an object"),
        "wrong type": (["validate", f"{v}/typed.jsonl"], 1, f"{v}/typed.jsonl:1: messages[1].content: expected a string, got int"),
        "empty file": (["validate", f"{v}/empty.jsonl"], 1, f"{v}/empty.jsonl: file is empty"),
        "wrong file type": (["validate", f"{v}/chat.csv"], 1, "not a '.csv' file"),
        "missing table": (["validate", "main.sales.nothing"], 1, "no Delta table main.sales.nothing at"),
        "missing split": (["validate", "acme/nothing/train"], 1, "acme/nothing/train: not a local file or folder, and no dataset"),
        "outside its volume": (["validate", "/Volumes/main/raw/files/../../../../etc/passwd"], 1, "'..' is not allowed"),
        "context length": (["validate", str(home / "ok.jsonl"), "--context-length", "0"], 2, "context_length 0: must be a positive"),
        "register_to": (["create", "--train-data-path", str(home / "ok.jsonl"), "--register-to", "main"], 2,
                        "register_to 'main': expected 'catalog.schema' or 'catalog.schema.model'"),
    }


@pytest.mark.slow
def test_every_class_of_bad_input_is_one_clear_message_without_a_traceback(home):
    for case, (args, code, message) in bad_inputs(home).items():
        result = tessera(*args, "--model", "tessera/tiny-chat")
        assert result.returncode == code, (case, result.stdout, result.stderr)
        assert message in result.stdout + result.stderr, (case, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, case
    assert not (home / "prepared").exists() or list((home / "prepared").iterdir()) == []
    assert not (home / "runs").exists()  # nothing was started
