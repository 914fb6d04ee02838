"""`tessera validate`: the data report before training, its exit codes and its JSON."""

import contextlib
import io
import json
import shutil
import subprocess
import sys

import pytest

from tasks.validate import histogram_png
from tessera import foundation_model as fm

from conftest import chat, write_jsonl


def tessera(*args) -> subprocess.CompletedProcess:
    """The CLI's main() in this process (a new process costs ~4 s of imports a call; tests/test_end_to_end.py runs
    the real `tessera` process): its exit code and what it printed. An exception it did not turn into a message
    propagates and fails the test, as a traceback would."""
    from tessera.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's usage errors, and messages the commands exit with
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
            code = exc.code if isinstance(exc.code, int) else 1
    return subprocess.CompletedProcess(["tessera", *args], code, out.getvalue(), err.getvalue())


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


def test_tokens_duration_trains_whole_steps_up_to_that_many(chat_file):
    report = fm.validate_data(str(chat_file), model="tessera/tiny-chat", training_duration="10_000tok")
    # the fewest whole optimizer steps that reach 10,000 tokens: what the trainer runs, and bills
    assert 10_000 <= report.billed_tokens < 10_000 + report.global_batch_tokens
    assert report.optimizer_steps > 10_000 // report.global_batch_tokens


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


def test_every_class_of_bad_input_is_one_clear_message_without_a_traceback(home):
    for case, (args, code, message) in bad_inputs(home).items():
        result = tessera(*args, "--model", "tessera/tiny-chat")
        assert result.returncode == code, (case, result.stdout, result.stderr)
        assert message in result.stdout + result.stderr, (case, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, case
    assert not (home / "prepared").exists() or list((home / "prepared").iterdir()) == []
    assert not (home / "runs").exists()  # nothing was started


def test_the_report_counts_the_files_a_text_folder_skips_and_why(home):
    folder = home / "docs"
    for rel, text in {
        "_thread.txt": "a thread", "__future__.txt": "the future", "_sub/x.txt": "in a folder named _sub",
        ".hidden.txt": "hidden", ".git/y.txt": "hidden", "notes.md": "not text",
    }.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_text(text)
    report = fm.validate_data(str(folder), model="tessera/tiny-chat", task_type="CONTINUED_PRETRAIN")
    assert report.valid and report.examples == 3  # every name starting with '_' is a document
    assert report.skipped_files == {"hidden file": 1, "in a hidden folder": 1, "not a .txt file": 1}
    assert "skipped files: 3 (hidden file: 1, in a hidden folder: 1, not a .txt file: 1)" in report.render()
    assert "3 file(s) in the folder are not documents and will not be trained on" in report.warnings
    (folder / ".git" / "z.txt").write_text("hidden too")  # the documents are the same: prepared data is reused
    again = fm.validate_data(str(folder), model="tessera/tiny-chat", task_type="CONTINUED_PRETRAIN")
    assert again.skipped_files["in a hidden folder"] == 2 and again.tokens_per_epoch == report.tokens_per_epoch


def tiny_chat_with(tiny_model_dir, out, template: str | None):
    """tiny-chat's config and tokenizer with another chat template (None: none), as a local model directory."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(out)
    shutil.copy(tiny_model_dir / "config.json", out)
    return out


def test_a_model_without_a_chat_template_is_one_clear_error_for_chats(home, chat_file, tiny_model_dir):
    model = tiny_chat_with(tiny_model_dir, home / "no-template", None)
    result = tessera("validate", str(chat_file), "--model", str(model))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith(f"error: model {model}: has no chat template, so it cannot be trained on CHAT_COMPLETION")
    pairs = write_jsonl(home / "pairs.jsonl", [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(5)])
    assert fm.validate_data(str(pairs), model=str(model), task_type="INSTRUCTION_FINETUNE").valid  # no template needed


def test_a_template_that_raises_on_a_record_names_the_model_and_the_record(home, tiny_model_dir):
    template = (
        "{% for m in messages %}{% if 'forbidden' in m['content'] %}{{ raise_exception('no forbidden words') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    model = tiny_chat_with(tiny_model_dir, home / "strict", template)
    path = write_jsonl(home / "chat.jsonl", [chat("q", "a"), chat("say the forbidden word", "no"), chat("q", "a")])
    result = tessera("validate", str(path), "--model", str(model))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == f"error: {path}:2: the chat template of model {model} cannot render this conversation: no forbidden words"


def test_a_template_that_refuses_system_messages_still_means_no_system_role(home, tiny_model_dir):
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('Only user and assistant roles are supported!') }}"
        "{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    model = tiny_chat_with(tiny_model_dir, home / "mistral-style", template)
    path = write_jsonl(home / "chat.jsonl", [chat("q", "a"), chat("q", "a", system="be brief")])
    report = fm.validate_data(str(path), model=str(model))
    assert not report.valid and report.errors == [f"{path}:2: messages[0].role: this model's chat template has no system role"]


def test_the_report_warns_when_eval_records_are_training_records(home):
    """finetune may evaluate on its training data (the demo does), but the report says so; a held-out set that
    shares some records with the training data is counted."""
    from tasks.validate import report_for
    from tessera.core.config import build_run_config
    from tessera.core.run_plan import resolve_run

    train = write_jsonl(home / "train.jsonl", [chat(f"question {i}", f"answer {i}") for i in range(6)])
    held = write_jsonl(home / "eval.jsonl", [chat(f"question {i}", f"answer {i}") for i in (1, 4, 7, 8)])
    run = dict(model="tessera/tiny-chat", train_data_path=str(train), register_to="main.s")
    report = report_for(resolve_run(build_run_config(**run, eval_data_path=str(held))))
    assert f"2 of the 4 records of eval_data_path {held} are also in the training data" in "\n".join(report.warnings)
    same = report_for(resolve_run(build_run_config(**run, eval_data_path=str(train))))
    assert any(w.startswith(f"eval_data_path {train} is the training data (the same path)") for w in same.warnings)
    assert not any("eval_data_path" in w for w in report_for(resolve_run(build_run_config(**run))).warnings)
