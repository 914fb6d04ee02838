import os

import pytest

from tessera.errors import TesseraError
from tessera.paths import resolve_data_path


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
