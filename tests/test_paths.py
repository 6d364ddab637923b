"""``auto_quant.paths``: the cache folders and the whole-file replacement every on-disk cache writes through."""

from __future__ import annotations

import pytest

from auto_quant.paths import replace_file, user_cache_dir


def test_user_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert user_cache_dir("tuner") == tmp_path / "auto_quant" / "tuner"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert user_cache_dir("calib").parts[-3:] == (".cache", "auto_quant", "calib")


def test_replace_file_swaps_whole_files_and_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "sub" / "picks.json"
    replace_file(path, lambda tmp: tmp.write_text("one"))
    replace_file(path, lambda tmp: tmp.write_text("two"))
    assert path.read_text() == "two"

    def fail(tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        replace_file(path, fail)
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["picks.json"]
