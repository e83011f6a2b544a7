"""The inventory loader: every key, every default, and one readable line for every mistake."""

from __future__ import annotations

import dataclasses
import datetime
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshtui.errors import InventoryError
from meshtui.inventory import (
    DEFAULT_MODEL_NAME,
    HeadSpec,
    HostSpec,
    Inventory,
    ModelSpec,
    SSHSpec,
    load_inventory,
    parse_inventory,
)

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3
SOURCE = "inventory.toml"

EVERY_KEY = """
[model]
path = "models/tiny.gguf"
context = 4096

[head]
compute = false
max_memory = "4GiB"
threads = 8

[ssh]
known_hosts = "/etc/meshtui/known_hosts"
connect_timeout = 3
keepalive_interval = 0.5

[[hosts]]
name = "laptop-a"
address = "192.0.2.10"
user = "alice"
port = 2222
identity_file = "keys/id_ed25519"
max_memory = 6442450944
threads = 4
python = "/usr/bin/python3.11"

[[hosts]]
name = "desktop_b.lan"
address = "2001:db8::2"
"""


def parse(text: str, base_dir: Path | None = Path("/base")) -> Inventory:
    return parse_inventory(text, source=SOURCE, base_dir=base_dir)


def error_of(text: str) -> str:
    with pytest.raises(InventoryError) as caught:
        parse(text)
    return str(caught.value)


# --- happy paths ---------------------------------------------------------------------------------------


def test_every_key() -> None:
    inventory = parse(EVERY_KEY)
    assert inventory == Inventory(
        source=SOURCE,
        model=ModelSpec(path=Path("/base/models/tiny.gguf"), name=None, context=4096),
        head=HeadSpec(compute=False, max_memory=4 * GIB, threads=8),
        ssh=SSHSpec(
            known_hosts=Path("/etc/meshtui/known_hosts"), connect_timeout=3.0, keepalive_interval=0.5
        ),
        hosts=(
            HostSpec(
                name="laptop-a",
                address="192.0.2.10",
                user="alice",
                port=2222,
                identity_file=Path("/base/keys/id_ed25519"),
                max_memory=6 * GIB,
                threads=4,
                python="/usr/bin/python3.11",
            ),
            HostSpec(name="desktop_b.lan", address="2001:db8::2"),
        ),
    )
    assert isinstance(inventory.ssh.connect_timeout, float)


def test_empty_file_is_a_head_only_mesh_with_the_default_model() -> None:
    inventory = parse("")
    assert inventory.model == ModelSpec(path=None, name=DEFAULT_MODEL_NAME, context=2048)
    assert inventory.head == HeadSpec(compute=True, max_memory=None, threads=None)
    assert inventory.ssh == SSHSpec(known_hosts=None, connect_timeout=15.0, keepalive_interval=5.0)
    assert inventory.hosts == ()
    assert parse("hosts = []").hosts == ()


def test_model_table_without_path_or_name_uses_the_default_model() -> None:
    assert parse("[model]\ncontext = 512").model == ModelSpec(path=None, name="smollm2", context=512)
    assert parse('[model]\nname = "other"').model == ModelSpec(path=None, name="other")


def test_a_draft_model_is_a_builtin_name_or_a_path_resolved_like_the_others() -> None:
    assert parse('[model]\ndraft = "smollm2"').model.draft == "smollm2"
    assert parse('[model]\ndraft = "drafts/small.gguf"').model.draft == "/base/drafts/small.gguf"
    assert parse("[model]").model.draft is None


def test_a_draft_file_that_is_missing_is_named_when_the_model_is_read() -> None:
    from meshtui.errors import ModelError
    from meshtui.models import resolve_draft_path

    with pytest.raises(ModelError, match=r"^draft model /base/none.gguf: no such file \(set \[model\] draft"):
        resolve_draft_path(parse('[model]\ndraft = "none.gguf"').model)


def test_host_defaults() -> None:
    (host,) = parse('[[hosts]]\nname = "a"\naddress = "a.lan"').hosts
    assert host == HostSpec(name="a", address="a.lan")
    assert (host.user, host.port, host.identity_file, host.max_memory, host.threads) == (None,) * 5
    assert host.python == "python3"


def test_specs_are_frozen() -> None:
    inventory = parse(EVERY_KEY)
    with pytest.raises(dataclasses.FrozenInstanceError):
        inventory.hosts[0].port = 22  # type: ignore[misc]


def test_example_file_parses_with_documented_values() -> None:
    inventory = load_inventory(REPO / "inventory.example.toml")
    assert inventory.model == ModelSpec(path=None, name="smollm2", context=2048)
    assert inventory.head == HeadSpec(compute=True, max_memory=4 * GIB, threads=8)
    assert inventory.ssh == SSHSpec(
        known_hosts=Path("~/.ssh/known_hosts").expanduser(), connect_timeout=15.0, keepalive_interval=5.0
    )
    laptop, desktop = inventory.hosts
    assert laptop == HostSpec(
        name="laptop-a",
        address="192.0.2.10",
        user="alice",
        port=22,
        identity_file=Path("~/.ssh/id_ed25519").expanduser(),
        max_memory=6 * GIB,
        threads=4,
        python="python3",
        cache_limit=16 * GIB,
        model_path="~/models/SmolLM2-135M-Instruct.Q4_1.gguf",
    )
    assert desktop == HostSpec(name="desktop-b", address="192.0.2.20")


def test_example_file_documents_every_key() -> None:
    text = (REPO / "inventory.example.toml").read_text()
    lines = [line.lstrip("# ") for line in text.splitlines()]
    for key in {
        f.name for spec in (ModelSpec, HeadSpec, SSHSpec, HostSpec) for f in dataclasses.fields(spec)
        if f.metadata.get("inventory_key", True)
    }:
        documented = [line for line in lines if line.startswith(f"{key} = ")]
        assert documented, f"{key} is not in the example"
        assert any("#" in line for line in documented), f"{key} has no comment"


# --- paths ---------------------------------------------------------------------------------------------


def test_relative_paths_resolve_against_base_dir_and_tilde_expands(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/tester")
    inventory = parse(
        '[model]\npath = "~/m.gguf"\n[ssh]\nknown_hosts = "kh"\n'
        '[[hosts]]\nname = "a"\naddress = "a"\nidentity_file = "../keys/id"\n'
    )
    assert inventory.model.path == Path("/home/tester/m.gguf")
    assert inventory.ssh.known_hosts == Path("/base/kh")
    assert inventory.hosts[0].identity_file == Path("/base/../keys/id")


def test_without_base_dir_relative_paths_resolve_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse('[model]\npath = "m.gguf"', base_dir=None).model.path == tmp_path / "m.gguf"


def test_load_inventory_resolves_against_the_files_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "lab").mkdir()
    (tmp_path / "lab" / "mesh.toml").write_text('[model]\npath = "tiny.gguf"\n')
    monkeypatch.chdir(tmp_path)
    inventory = load_inventory(Path("lab/mesh.toml"))
    assert inventory.source == "lab/mesh.toml"
    assert inventory.model.path == tmp_path / "lab" / "tiny.gguf"
    assert inventory.model.path.is_absolute()


def test_model_file_existence_is_not_checked_here() -> None:
    assert parse('[model]\npath = "/nowhere/at/all.gguf"').model.path == Path("/nowhere/at/all.gguf")


# --- errors: the full line the user sees ---------------------------------------------------------------

HOST = '[[hosts]]\nname = "h0"\naddress = "192.0.2.1"\n'


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            HOST + '[[hosts]]\nname = "h1"\naddress = "192.0.2.2"\nport = "22x"\n',
            'inventory.toml: hosts[1].port: expected an integer 1..65535, got "22x"',
        ),
        (HOST + "port = 0\n", "inventory.toml: hosts[0].port: expected an integer 1..65535, got 0"),
        (HOST + "port = 65536\n", "inventory.toml: hosts[0].port: expected an integer 1..65535, got 65536"),
        (HOST + "port = true\n", "inventory.toml: hosts[0].port: expected an integer 1..65535, got true"),
        (HOST + "threads = 0\n", "inventory.toml: hosts[0].threads: expected an integer >= 1, got 0"),
        (
            "hsots = []\n",
            "inventory.toml: unknown key 'hsots' "
            "(did you mean 'hosts'? expected one of: head, hosts, model, ssh)",
        ),
        ("zzz = 1\n", "inventory.toml: unknown key 'zzz' (expected one of: head, hosts, model, ssh)"),
        (
            HOST + "prot = 22\n",
            "inventory.toml: hosts[0]: unknown key 'prot' (did you mean 'port'? expected one of: address, "
            "cache_limit, gpu, identity_file, max_memory, model_path, name, port, python, runtime, "
            "threads, user)",
        ),
        (
            "[ssh]\ntimeout = 3\n",
            "inventory.toml: ssh: unknown key 'timeout' (did you mean 'connect_timeout'? expected one of: "
            "connect_timeout, keepalive_interval, known_hosts)",
        ),
        (
            '[[hosts]]\nname = "laptop-a"\naddress = "a"\n[[hosts]]\nname = "b"\naddress = "b"\n'
            '[[hosts]]\nname = "laptop-a"\naddress = "c"\n',
            'inventory.toml: hosts[2].name: duplicate host name "laptop-a" (also hosts[0])',
        ),
        (
            '[model]\npath = "a.gguf"\nname = "smollm2"\n',
            "inventory.toml: model: set exactly one of 'path' or 'name'",
        ),
        (
            '[model]\nname = "smollm2"\ncontext 2048\n',
            "inventory.toml: line 3: invalid TOML: Expected '=' after a key in a key/value pair",
        ),
        ("[model\n", "inventory.toml: line 1: invalid TOML: Expected ']' at the end of a table declaration"),
        ('a = "', "inventory.toml: line 1: invalid TOML: Unterminated string"),
        (
            '[[hosts]]\nname = "head"\naddress = "a"\n',
            'inventory.toml: hosts[0].name: "head" is reserved for this machine',
        ),
        ('[[hosts]]\nname = "a"\n', "inventory.toml: hosts[0]: missing required key 'address'"),
        (
            '[hosts]\nname = "a"\n',
            "inventory.toml: hosts: expected an array of tables ([[hosts]]), got a table",
        ),
        ("hosts = [1]\n", "inventory.toml: hosts[0]: expected a table, got 1"),
        ('model = "smollm2"\n', 'inventory.toml: model: expected a table, got "smollm2"'),
        ("[model]\ncontext = 0\n", "inventory.toml: model.context: expected an integer >= 1, got 0"),
        ('[model]\ncontext = "2k"\n', 'inventory.toml: model.context: expected an integer >= 1, got "2k"'),
        (
            "[model]\ncontext = 2048.0\n",
            "inventory.toml: model.context: expected an integer >= 1, got 2048.0",
        ),
        ("[model]\npath = 3\n", "inventory.toml: model.path: expected a file path, got 3"),
        ('[model]\npath = ""\n', 'inventory.toml: model.path: expected a file path, got ""'),
        ('[head]\ncompute = "yes"\n', 'inventory.toml: head.compute: expected true or false, got "yes"'),
        ("[head]\ncompute = 1\n", "inventory.toml: head.compute: expected true or false, got 1"),
        (
            "[head]\nmax_memory = true\n",
            'inventory.toml: head.max_memory: expected a size such as "6GiB" or a number of bytes, got true',
        ),
        (
            "[ssh]\nconnect_timeout = 0\n",
            "inventory.toml: ssh.connect_timeout: expected a number of seconds > 0, got 0",
        ),
        (
            "[ssh]\nkeepalive_interval = nan\n",
            "inventory.toml: ssh.keepalive_interval: expected a number of seconds > 0, got nan",
        ),
        (
            "[ssh]\nconnect_timeout = 1979-05-27\n",
            "inventory.toml: ssh.connect_timeout: expected a number of seconds > 0, got 1979-05-27",
        ),
        (
            '[[hosts]]\nname = "a"\naddress = "my host"\n',
            'inventory.toml: hosts[0].address: expected a hostname or IP address, got "my host"',
        ),
        (
            '[[hosts]]\nname = "a"\naddress = "-oProxyCommand=sh"\n',
            'inventory.toml: hosts[0].address: expected a hostname or IP address, got "-oProxyCommand=sh"',
        ),
        (
            '[[hosts]]\nname = "a b"\naddress = "a"\n',
            "inventory.toml: hosts[0].name: expected a name of 1-32 letters, digits, '_', '.' or '-', "
            'got "a b"',
        ),
        (
            '[[hosts]]\nname = "a"\naddress = "a"\npython = "python3\\nrm -rf /"\n',
            "inventory.toml: hosts[0].python: expected an interpreter command on one line, "
            'got "python3\\nrm -rf /"',
        ),
        (
            '[[hosts]]\nname = "a"\naddress = "a"\nuser = ""\n',
            'inventory.toml: hosts[0].user: expected a user name, got ""',
        ),
    ],
)
def test_error_messages(text: str, message: str) -> None:
    assert error_of(text) == message


def test_host_name_length_limit() -> None:
    assert parse(f'[[hosts]]\nname = "{"n" * 32}"\naddress = "a"').hosts[0].name == "n" * 32
    assert error_of(f'[[hosts]]\nname = "{"n" * 33}"\naddress = "a"').startswith(
        "inventory.toml: hosts[0].name: "
    )


@pytest.mark.parametrize("size", ['"lots"', "0", "-5", '"0GiB"', '"1.5"'])
def test_bad_sizes_keep_parse_sizes_reason_on_one_line(size: str) -> None:
    message = error_of(f"{HOST}max_memory = {size}\n")
    assert message.startswith("inventory.toml: hosts[0].max_memory: ")
    assert "is not" in message and "\n" not in message


def test_sizes_accept_units_and_bytes() -> None:
    assert parse('[head]\nmax_memory = "512MiB"').head.max_memory == 512 * 1024**2
    assert parse("[head]\nmax_memory = 1024").head.max_memory == 1024


def test_unexpandable_home_is_an_inventory_error() -> None:
    message = error_of('[model]\npath = "~no_such_user_meshtui/m.gguf"\n')
    assert message.startswith('inventory.toml: model.path: cannot expand "~no_such_user_meshtui/m.gguf": ')


def test_nesting_too_deep_and_huge_integers_are_inventory_errors() -> None:
    assert error_of("a = " + "[" * 5000 + "]" * 5000) == (
        "inventory.toml: invalid TOML: arrays or tables nested too deeply"
    )
    assert error_of("a = " + "9" * 5000).startswith("inventory.toml: invalid TOML: ")
    big = error_of(HOST + "port = 0x" + "f" * 5000)
    assert big == "inventory.toml: hosts[0].port: expected an integer 1..65535, got an integer too large"


def test_load_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(InventoryError) as caught:
        load_inventory(missing)
    assert str(caught.value) == f"{missing}: cannot read file: No such file or directory"
    assert caught.value.exit_code == 2


def test_load_directory_and_binary(tmp_path: Path) -> None:
    with pytest.raises(InventoryError, match=r": cannot read file: Is a directory$"):
        load_inventory(tmp_path)
    binary = tmp_path / "model.gguf"
    binary.write_bytes(b"GGUF\xff\xfe\x00")
    with pytest.raises(InventoryError) as caught:
        load_inventory(binary)
    assert str(caught.value) == f"{binary}: cannot read file: not UTF-8 text (byte 4)"


def test_load_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "mesh.toml"
    path.write_text('[[hosts]]\nname = "a"\naddress = "a"\nport = "22x"\n')
    with pytest.raises(InventoryError) as caught:
        load_inventory(path)
    assert str(caught.value) == f'{path}: hosts[0].port: expected an integer 1..65535, got "22x"'


# --- fuzz: only ever an Inventory or one InventoryError line -------------------------------------------

SPECS = (ModelSpec, HeadSpec, SSHSpec, HostSpec)
REAL_KEYS = sorted(
    {"model", "head", "ssh", "hosts"} | {f.name for spec in SPECS for f in dataclasses.fields(spec)}
)
KEYS = st.one_of(st.sampled_from(REAL_KEYS), st.text(max_size=8))
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=0, max_value=70000),
    st.floats(),
    st.text(max_size=16),
    st.dates(),
    st.sampled_from(["6GiB", "512MiB", "0", "-1GiB", "head", "~/x", "~nobody_zz/x", "rel/p"]),
    st.sampled_from(["22", "192.0.2.1", "smollm2", "-x", "laptop-a", "python3", "a b", "x\ny", ""]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=20,
)
SECTION = st.dictionaries(KEYS, SCALARS, max_size=6)
SHAPED = st.fixed_dictionaries(
    {},
    optional={"model": SECTION, "head": SECTION, "ssh": SECTION, "hosts": st.lists(SECTION, max_size=4)},
)
# Mostly-right values per key, so the fuzz also walks the paths that end in a valid Inventory.
_FILES = st.sampled_from(["m.gguf", "~/m.gguf", "/abs/m.gguf", "../keys/id"])
_SECONDS = st.floats(min_value=0.01, max_value=60) | st.integers(min_value=1, max_value=60)
_SIZES = st.sampled_from(["6GiB", "512MiB", "1.5GB"]) | st.integers(min_value=1, max_value=2**40)
PLAUSIBLE: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "model": {"path": _FILES, "name": st.just("smollm2"), "context": st.integers(1, 8192)},
    "head": {"compute": st.booleans(), "max_memory": _SIZES, "threads": st.integers(1, 64)},
    "ssh": {"known_hosts": _FILES, "connect_timeout": _SECONDS, "keepalive_interval": _SECONDS},
    "hosts": {
        "name": st.sampled_from(["a", "b", "laptop-a", "c.lan", "HEAD"]),
        "address": st.sampled_from(["192.0.2.1", "host.lan", "2001:db8::1"]),
        "user": st.just("alice"),
        "port": st.integers(1, 65535),
        "identity_file": _FILES,
        "max_memory": _SIZES,
        "threads": st.integers(1, 64),
        "python": st.just("python3"),
    },
}


def plausible_section(section: str) -> st.SearchStrategy[dict[str, Any]]:
    fields = PLAUSIBLE[section]
    optional = {key: value | value | value | SCALARS for key, value in fields.items()}
    required = {key: optional.pop(key) for key in ("name", "address") if section == "hosts"}
    return st.fixed_dictionaries(required, optional=optional)


PLAUSIBLE_DOCUMENT = st.fixed_dictionaries(
    {},
    optional={
        "model": plausible_section("model"),
        "head": plausible_section("head"),
        "ssh": plausible_section("ssh"),
        "hosts": st.lists(plausible_section("hosts"), max_size=3),
    },
)
DOCUMENTS = st.one_of(st.dictionaries(KEYS, VALUES, max_size=5), SHAPED, PLAUSIBLE_DOCUMENT)


def toml_string(text: str) -> str:
    def escape(c: str) -> str:
        if c in '"\\':
            return "\\" + c
        return f"\\u{ord(c):04x}" if ord(c) < 0x20 or c == "\x7f" else c

    return '"' + "".join(map(escape, text)) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, datetime.date):
        return value.isoformat()
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_document(document: dict[str, Any], headers: bool) -> str:
    """A tiny TOML writer: inline values, or [table] / [[array]] headers for the top level's tables."""
    if not headers:
        return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in document.items())
    plain = {k: v for k, v in document.items() if not isinstance(v, (dict, list))}
    lines = [f"{toml_string(k)} = {toml_value(v)}" for k, v in plain.items()]
    for key, value in document.items():
        if isinstance(value, dict):
            lines.append(f"[{toml_string(key)}]")
            lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for item in value:
                lines.append(f"[[{toml_string(key)}]]")
                lines += [f"{toml_string(k)} = {toml_value(v)}" for k, v in item.items()]
        elif isinstance(value, list):
            lines.insert(0, f"{toml_string(key)} = {toml_value(value)}")
    return "\n".join(lines) + "\n"


def check_outcome(text: str) -> Inventory | str:
    try:
        inventory = parse(text)
    except InventoryError as err:
        message = str(err)
        assert message.startswith(f"{SOURCE}: ")
        assert message.splitlines() == [message]
        assert message.isprintable()
        return message
    assert isinstance(inventory, Inventory)
    assert (inventory.model.path is None) != (inventory.model.name is None)
    names = [host.name for host in inventory.hosts]
    assert len(set(names)) == len(names) and "head" not in names
    paths = [inventory.model.path, inventory.ssh.known_hosts, *(h.identity_file for h in inventory.hosts)]
    assert all(path is None or path.is_absolute() for path in paths)
    return inventory


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_fuzz_arbitrary_text(text: str) -> None:
    check_outcome(text)


@settings(max_examples=400, deadline=None)
@given(DOCUMENTS, st.booleans())
def test_fuzz_toml_documents(document: dict[str, Any], headers: bool) -> None:
    outcome = check_outcome(toml_document(document, headers))
    assert not (isinstance(outcome, str) and "invalid TOML" in outcome), outcome
