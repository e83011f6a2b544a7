"""Where the head's Unix sockets go: fresh 0700 folders, in a private place, short enough for sun_path."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from meshtui.unixsock import MAX_SOCKET_PATH, private_socket_dir, remove_socket_dir, unix_endpoint


@pytest.fixture
def short_tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="mtus-"))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_fresh_0700_folder_in_the_cache_run_dir_whatever_the_umask(monkeypatch, short_tmp: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(short_tmp / "cache"))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    old = os.umask(0)
    try:
        first = private_socket_dir("tunnel-", "stage.sock")
        second = private_socket_dir("tunnel-", "stage.sock")
    finally:
        os.umask(old)
    assert first.parent == second.parent == short_tmp / "cache/meshtui/run" and first != second
    assert first.name.startswith("tunnel-") and mode(first) == mode(second) == mode(first.parent) == 0o700
    (first / "stage.sock").write_text("")
    remove_socket_dir(first)
    assert not first.exists() and second.exists()
    assert unix_endpoint(second / "stage.sock") == f"unix:{second}/stage.sock"


def test_xdg_runtime_dir_only_when_it_is_ours_and_private(monkeypatch, short_tmp: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(short_tmp / "cache"))
    runtime = short_tmp / "runtime"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert private_socket_dir("t-", "s.sock").parent == runtime / "meshtui"
    runtime.chmod(0o755)  # others may list it: not the private place it should be
    assert private_socket_dir("t-", "s.sock").parent == short_tmp / "cache/meshtui/run"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp / "missing"))
    assert private_socket_dir("t-", "s.sock").parent == short_tmp / "cache/meshtui/run"


def test_too_long_for_sun_path_falls_back_to_a_0700_temp_folder(monkeypatch, short_tmp: Path) -> None:
    deep = short_tmp / ("d" * MAX_SOCKET_PATH)
    monkeypatch.setenv("XDG_CACHE_HOME", str(deep))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(short_tmp))
    tempfile.tempdir = None  # re-read TMPDIR
    try:
        folder = private_socket_dir("tunnel-", "stage.sock")
    finally:
        tempfile.tempdir = None
    assert folder.parent == short_tmp and folder.name.startswith("meshtui-tunnel-") and mode(folder) == 0o700
    assert len(str(folder / "stage.sock").encode()) <= MAX_SOCKET_PATH
    assert list((deep / "meshtui/run").iterdir()) == []  # the long one was removed again


@pytest.mark.parametrize("value", [None, 5, "stage.sock", "/" + "s" * MAX_SOCKET_PATH, "/tmp/\x1b]0;owned\x07.sock"])
def test_a_socket_path_a_host_reports_is_checked(value: object) -> None:
    from meshtui.hostfacts import socket_path_field

    assert socket_path_field({"socket": "/home/u/.cache/meshtui/run/stage-ab/stage.sock"}).endswith("/stage.sock")
    with pytest.raises(ValueError, match=rf"^key 'socket': expected an absolute path of at most {MAX_SOCKET_PATH} "):
        socket_path_field({"socket": value})
