"""What hosts, model files and HTTP clients send is checked, bounded and made printable before the head uses it."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
from pathlib import Path
from typing import Any

import pytest

from meshtui.api import binds_loopback_only, resolve_api_key
from meshtui.errors import HostError, InventoryError
from meshtui.hosts import HostFacts
from meshtui.integrity import Problem, built_runtime_record, make_private_dir, runtime_problems
from meshtui.remoteio import read_lines
from meshtui.runtime import agent_source_path, load_file_module
from meshtui.text import one_line, printable

GOOD_PROBE: dict[str, Any] = {
    "agent_version": "1", "hostname": "h1", "python": "3.11.2", "os": "Linux", "kernel": "6.1", "arch": "x86_64",
    "glibc": "2.36", "cores": 8, "mem_total": 16 * 1024**3, "mem_available": 8 * 1024**3,
    "gpus": [{"name": "NVIDIA H100", "vendor": "nvidia", "memory_total": 80 * 1024**3, "memory_free": 79 * 1024**3}],
    "mem_bandwidth": 10**10, "nvcc": True, "cmake": False,
}


# ---------------------------------------------------------------- printable


def test_printable_shows_controls_escapes_and_bidi_visibly() -> None:
    assert printable("GET /\x1b]0;owned\x07") == "GET /\\x1b]0;owned\\x07"
    assert printable("a\x7fb\x9bc\u202ed\u2066e") == "a\\x7fb\\x9bc\\u202ed\\u2066e"
    assert printable("line\nnext\r") == "line\\x0anext\\x0d"
    assert printable("line\nnext\tcol", keep_newlines=True) == "line\nnext\tcol"
    assert printable("plain, accents é, emoji 👍🏽, CJK 漢字") == "plain, accents é, emoji 👍🏽, CJK 漢字"
    hostile = "\x1b[2J\x1b]52;c;Zm9v\x07\u202e\x00"
    once = printable(hostile)
    assert once == printable(once)  # idempotent
    assert once.isprintable()


def test_one_line_is_printable_flat_and_bounded() -> None:
    assert one_line("boom\x1b[31m\nnext line", 40) == "boom\\x1b[31m next line"
    assert one_line("x" * 500, 20) == "x" * 19 + "…"


def test_errors_are_printable_whatever_they_quote() -> None:
    assert str(HostError("agent said \x1b]0;owned\x07", host="h1")) == "h1: agent said \\x1b]0;owned\\x07"


# ---------------------------------------------------------------- the probe's answer


def test_a_good_probe_is_accepted() -> None:
    facts = HostFacts.from_json(json.loads(json.dumps(GOOD_PROBE)))
    assert (facts.cores, facts.nvcc, facts.gpus[0]["name"]) == (8, True, "NVIDIA H100")
    assert HostFacts.from_json(facts.to_json()) == facts


@pytest.mark.parametrize(("change", "message"), [
    ({"cores": float("inf")}, "key 'cores': expected an integer from 1 to 1048576"),
    ({"cores": 0}, "key 'cores': expected an integer from 1 to 1048576"),
    ({"cores": True}, "key 'cores': expected an integer from 1 to 1048576"),
    ({"cores": "8"}, "key 'cores': expected an integer from 1 to 1048576"),
    ({"mem_total": float("nan")}, "key 'mem_total': expected an integer from 0 to 1152921504606846976"),
    ({"mem_available": -1}, "key 'mem_available': expected an integer from 0 to 1152921504606846976"),
    ({"mem_available": 10**30}, "key 'mem_available': expected an integer from 0 to 1152921504606846976"),
    ({"gpus": ["x"]}, "key 'gpus[0]': expected an object"),
    ({"gpus": {"name": "x"}}, "key 'gpus': expected a list of at most 64 objects"),
    ({"gpus": [{}] * 65}, "key 'gpus': expected a list of at most 64 objects"),
    ({"gpus": [{"name": "g", "vendor": "v", "memory_total": 1, "memory_free": 1.5}]},
     "key 'gpus[0].memory_free': expected an integer from 0 to 1152921504606846976"),
    ({"gpus": [{"name": 3, "vendor": "v", "memory_total": 1, "memory_free": 1}]},
     "key 'gpus[0].name': expected a string of at most 256 characters"),
    ({"gpus": [{"name": "g", "vendor": "v", "memory_total": 1, "memory_free": 1, "x": 1}]},
     "unexpected key 'gpus[0].x'"),
    ({"hostname": "h" * 10_000}, "key 'hostname': expected a string of at most 256 characters"),
    ({"arch": None}, "key 'arch': expected a string of at most 256 characters"),
    ({"nvcc": "yes"}, "key 'nvcc': expected true or false"),
    ({"evil\x1b]0;x\x07": 1}, "unexpected key 'evil\\x1b]0;x\\x07'"),
])
def test_a_hostile_probe_is_refused_naming_the_key(change: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError) as caught:
        HostFacts.from_json({**GOOD_PROBE, **change})
    assert str(caught.value) == message


def test_probe_strings_are_made_printable() -> None:
    facts = HostFacts.from_json({**GOOD_PROBE, "hostname": "h\x1b]0;owned\x07", "gpus": [
        {"name": "G\u202eU", "vendor": "nvidia", "memory_total": 1, "memory_free": 1}]})
    assert facts.hostname == "h\\x1b]0;owned\\x07" and facts.gpus[0]["name"] == "G\\u202eU"


def test_not_an_object_is_refused() -> None:
    with pytest.raises(ValueError, match="not a JSON object"):
        HostFacts.from_json(["cores", 8])


# ---------------------------------------------------------------- lines read from hosts are bounded


class _Chunks:
    """A stream that hands out fixed chunks, like an SSHReader."""

    def __init__(self, *chunks: str) -> None:
        self.chunks = list(chunks)

    async def read(self, n: int = -1) -> str:
        return self.chunks.pop(0) if self.chunks else ""


async def test_read_lines_cuts_overlong_lines_and_drops_their_rest() -> None:
    stream = _Chunks("short\nxxxx", "xxxxxxxxxx", "xxxxx\nnext", " line\n", "tail")
    lines = [line async for line in read_lines(stream, limit=8)]  # type: ignore[arg-type]
    assert lines == ["short", "xxxxxxxx", "next line", "tail"]


# ---------------------------------------------------------------- the runtime check


def _inspect(folder: Path, home: Path) -> Any:
    agent = load_file_module(agent_source_path(), "meshtui_agent_test")
    return agent.inspect_tree(str(folder.relative_to(home)), home=str(home))


def _runtime(home: Path) -> tuple[Path, dict[str, str]]:
    folder = make_private_dir(home / ".cache/meshtui/runtime/abc", home)
    (folder / "lib").mkdir(mode=0o700)
    digests = {}
    for rel, data in (("meshtui_agent.py", b"agent"), ("lib/libggml.so.0", b"ggml")):
        (folder / rel).write_bytes(data)
        os.chmod(folder / rel, 0o700)
        digests[rel] = __import__("hashlib").sha256(data).hexdigest()
    (folder / ".complete").write_text("abc\n")
    os.chmod(folder / ".complete", 0o600)
    return folder, digests


def test_made_folders_are_private_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o002)
    try:
        (tmp_path / ".cache").mkdir(mode=0o775)
        os.chmod(tmp_path / ".cache", 0o775)
        (tmp_path / ".cache/meshtui").mkdir(mode=0o775)
        os.chmod(tmp_path / ".cache/meshtui", 0o775)  # made by an older meshtui
        make_private_dir(tmp_path / ".cache/meshtui/runtime/abc/lib", tmp_path)
    finally:
        os.umask(old)
    modes = {p: stat.S_IMODE((tmp_path / p).stat().st_mode) for p in
             (".cache", ".cache/meshtui", ".cache/meshtui/runtime", ".cache/meshtui/runtime/abc/lib")}
    # ~/.cache is the user's, not meshtui's: left as it was. meshtui's own are tightened or made 0700.
    assert modes == {".cache": 0o775, ".cache/meshtui": 0o700, ".cache/meshtui/runtime": 0o700,
                     ".cache/meshtui/runtime/abc/lib": 0o700}


def _texts(problems: list[Problem]) -> list[str]:
    return [str(p) for p in problems]


def test_an_intact_runtime_passes_and_every_change_is_named(tmp_path: Path) -> None:
    folder, digests = _runtime(tmp_path)
    check = lambda: _texts(runtime_problems(_inspect(folder, tmp_path), digests,  # noqa: E731
                                            digests["meshtui_agent.py"], "meshtui_agent.py"))
    assert check() == []
    with (folder / "lib/libggml.so.0").open("ab") as f:
        f.write(b"\0")
    assert check() == ["lib/libggml.so.0: its sha256 is not the head's (the file was changed)"]
    (folder / "lib/libggml.so.0").write_bytes(b"ggml")
    os.chmod(folder / "meshtui_agent.py", 0o720)
    assert check() == ["meshtui_agent.py: writable by group or others (mode 0720)"]
    os.chmod(folder / "meshtui_agent.py", 0o700)
    (folder / "lib/libggml-cpu-evil.so").write_bytes(b"x")
    assert check() == ["lib/libggml-cpu-evil.so: not part of the runtime"]
    (folder / "lib/libggml-cpu-evil.so").unlink()
    (folder / "lib/libggml.so.0").unlink()
    (folder / "lib/libggml.so.0").symlink_to("/tmp/elsewhere.so")
    assert check() == ["lib/libggml.so.0: is a link, not a plain file or folder", "lib/libggml.so.0: missing"]
    (folder / "lib/libggml.so.0").unlink()
    (folder / "lib/libggml.so.0").write_bytes(b"ggml")
    os.chmod(tmp_path / ".cache/meshtui/runtime", 0o777)
    assert check() == ["~/.cache/meshtui/runtime: writable by group or others (mode 0777)"]
    # A folder above the runtime is told apart by a field, not by its text: pushing again cannot fix it.
    above = runtime_problems(_inspect(folder, tmp_path), digests, digests["meshtui_agent.py"], "meshtui_agent.py")
    assert [p.above for p in above] == [True]
    os.chmod(tmp_path / ".cache/meshtui/runtime", 0o700)
    assert check() == []
    os.chown(folder / "lib/libggml.so.0", 12345, -1)
    assert check() == [f"lib/libggml.so.0: owned by uid 12345, not by the user (uid {os.getuid()})"]


def test_a_built_runtime_is_checked_for_owner_mode_and_its_agent(tmp_path: Path) -> None:
    folder, digests = _runtime(tmp_path)
    (folder / "lib/libggml-cuda.so.0").write_bytes(b"built there")
    os.chmod(folder / "lib/libggml-cuda.so.0", 0o700)
    report = _inspect(folder, tmp_path)
    assert runtime_problems(report, None, digests["meshtui_agent.py"], "meshtui_agent.py") == []
    assert _texts(runtime_problems(report, None, "0" * 64, "meshtui_agent.py")) == [
        "meshtui_agent.py: its sha256 is not the head's (the file was changed)"]
    # What the head records of it once that check passed: every file but the marker, then checked like a push.
    record = built_runtime_record(report)
    assert record == {**digests, "lib/libggml-cuda.so.0": hashlib.sha256(b"built there").hexdigest()}
    assert runtime_problems(report, record, record["meshtui_agent.py"], "meshtui_agent.py") == []
    (folder / "lib/libggml-cuda.so.0").write_bytes(b"built elsewhere")
    (folder / "lib/libggml-vulkan.so.0").write_bytes(b"added")
    changed = runtime_problems(_inspect(folder, tmp_path), record, record["meshtui_agent.py"], "meshtui_agent.py")
    assert not any(p.above for p in changed)
    assert _texts(changed) == [
        "lib/libggml-vulkan.so.0: not part of the runtime",
        "lib/libggml-cuda.so.0: its sha256 is not the head's (the file was changed)"]


@pytest.mark.parametrize("report", [None, [], {"error": "boom\x1b"}, {"uid": "0", "ancestors": [], "entries": {}},
                                    {"uid": 0, "ancestors": [], "entries": {}}])
def test_a_bad_check_report_is_a_problem(report: Any) -> None:
    assert runtime_problems(report, {}, "", "meshtui_agent.py")


# ---------------------------------------------------------------- API options


def test_a_bind_is_loopback_only_if_every_address_it_resolves_to_is(monkeypatch: pytest.MonkeyPatch) -> None:
    assert binds_loopback_only("127.0.0.1") and binds_loopback_only("::1") and binds_loopback_only("[::1]")
    assert not binds_loopback_only("0.0.0.0") and not binds_loopback_only("") and not binds_loopback_only("::")
    real = socket.getaddrinfo
    answers = {"lan.localhost": ["127.0.0.1", "192.0.2.7"], "only.localhost": ["127.0.0.1", "::1"],
               "gone.localhost": []}

    def fake_getaddrinfo(host: str, *args: Any, **kwargs: Any) -> list[Any]:
        if host not in answers:
            return real(host, *args, **kwargs)
        if not answers[host]:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, 0))
                for a in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert binds_loopback_only("only.localhost")
    assert not binds_loopback_only("lan.localhost")  # a name is not loopback for ending in .localhost
    assert not binds_loopback_only("gone.localhost")


def test_the_key_comes_from_the_flag_the_file_or_the_environment(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHTUI_API_KEY", "from-env")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key("from-flag", key_file) == "from-flag"
    assert resolve_api_key(None, key_file) == "from-file"
    assert resolve_api_key(None, None) == "from-env"
    monkeypatch.delenv("MESHTUI_API_KEY")
    assert resolve_api_key(None, None) is None
    key_file.write_text("\n")
    with pytest.raises(InventoryError) as empty:
        resolve_api_key(None, key_file)
    assert str(empty.value) == f"--api-key-file {key_file}: the file holds no key"
    with pytest.raises(InventoryError) as missing:
        resolve_api_key(None, tmp_path / "nope")
    assert str(missing.value) == f"--api-key-file {tmp_path / 'nope'}: cannot read it: No such file or directory"


# ---------------------------------------------------------------- model files


def test_a_model_name_with_escapes_is_made_printable() -> None:
    from synth import synthetic_model

    from meshtui.gguf_facts import read_model_facts

    model = synthetic_model(n_layer=2, name="evil\x1b]0;owned\x07\u202e")
    assert read_model_facts(model).name == "evil\\x1b]0;owned\\x07\\u202e"
