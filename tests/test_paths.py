import os

import pytest

from tessera.core.errors import TesseraError
from tessera.core.paths import resolve_data_path


def test_volume_paths_resolve_under_the_volumes_root(home):
    expected = home / "volumes" / "main" / "sales" / "raw" / "chat.jsonl"
    assert resolve_data_path("dbfs:/Volumes/main/sales/raw/chat.jsonl") == expected
    assert resolve_data_path("/Volumes/main/sales/raw/chat.jsonl") == expected


def test_volumes_root_is_configurable(home, tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_VOLUMES_ROOT", str(tmp_path / "elsewhere"))
    assert resolve_data_path("/Volumes/a/b/c/x.jsonl") == tmp_path / "elsewhere" / "a" / "b" / "c" / "x.jsonl"


def test_plain_local_paths_pass_through(home, tmp_path):
    assert resolve_data_path(str(tmp_path / "data.jsonl")) == tmp_path / "data.jsonl"


@pytest.mark.parametrize("path", ["/Volumes/main", "dbfs:/Volumes/main/sales", "/Volumes/", "dbfs:/Volumes"])
def test_fewer_than_three_levels_is_refused(home, path):
    with pytest.raises(TesseraError, match="catalog>/<schema>/<volume>"):
        resolve_data_path(path)


def test_dotdot_is_refused(home):
    with pytest.raises(TesseraError, match=r"'\.\.'"):
        resolve_data_path("/Volumes/main/sales/raw/../../other/vol/x.jsonl")


def test_symlink_out_of_the_volume_is_refused(home, tmp_path):
    volume = home / "volumes" / "main" / "sales" / "raw"
    volume.mkdir(parents=True)
    secret = tmp_path / "secret.jsonl"
    secret.write_text("{}\n")
    os.symlink(secret, volume / "link.jsonl")
    with pytest.raises(TesseraError, match="outside its volume"):
        resolve_data_path("/Volumes/main/sales/raw/link.jsonl")


def test_symlink_inside_the_volume_is_fine(home):
    volume = home / "volumes" / "main" / "sales" / "raw"
    (volume / "sub").mkdir(parents=True)
    (volume / "sub" / "a.jsonl").write_text("{}\n")
    os.symlink(volume / "sub" / "a.jsonl", volume / "b.jsonl")
    assert resolve_data_path("/Volumes/main/sales/raw/b.jsonl") == volume / "sub" / "a.jsonl"


def test_a_lock_is_seen_held_while_another_holder_has_it(tmp_path):
    """is_locked probes without waiting: true while a file_lock is held (by any other open of the file), false
    before, after, and for a lock file that was never made."""
    import subprocess
    import sys

    from tessera.core.paths import file_lock, is_locked

    lock = tmp_path / "endpoint.lock"
    assert not is_locked(lock) and not lock.exists()  # the probe creates nothing
    with file_lock(lock):
        assert is_locked(lock)
    assert not is_locked(lock)
    holder = subprocess.Popen([sys.executable, "-c", f"from tessera.core.paths import file_lock\nimport sys\n"
                               f"with file_lock({str(lock)!r}):\n    print('held', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    assert is_locked(lock)  # held by another process
    holder.communicate("", timeout=30)
    assert not is_locked(lock)
