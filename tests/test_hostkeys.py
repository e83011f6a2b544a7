"""Host-key decisions as plain data: OpenSSH's check_host_key rules, without a network.

The same rules are checked against OpenSSH itself on the namespace lab in tests/test_hostkeys_lab.py; these
cover what the lab cannot reach (a host name that is not an address, for CheckHostIP) and the file format.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import asyncssh
import pytest

from meshtui.hostkeys import (
    HostKeyTarget,
    KnownHosts,
    append_known_hosts,
    decide_host_key,
    hash_name,
    known_hosts_line,
    parse_known_hosts,
    read_known_hosts_files,
    trusted_without_question,
)

KEY = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
OTHER = asyncssh.generate_private_key("ssh-ed25519").convert_to_public()
FILE = Path("/u/known_hosts")


def _text(key: asyncssh.SSHKey) -> str:
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


def _known(text: str) -> KnownHosts:
    return KnownHosts(parse_known_hosts(text.format(key=_text(KEY), other=_text(OTHER)), FILE))


def _decide(text: str, target: HostKeyTarget, *, accept_new: bool = True, hashed: bool = False,
            can_record: bool = True):
    return decide_host_key(KEY, target, _known(text), accept_new=accept_new, can_record=can_record,
                           hash_names=hashed)


NAMED = HostKeyTarget(hostname="build.example", port=22, peer_address="198.51.100.7", check_host_ip=True)
NAMED_2222 = HostKeyTarget(hostname="build.example", port=2222, peer_address="198.51.100.7", check_host_ip=True)


def test_a_key_known_under_the_address_only_does_not_vouch_for_the_name() -> None:
    decision = _decide("198.51.100.7 {key}\n", NAMED, accept_new=False)
    assert (decision.status, decision.accepted) == ("new", False)


def test_check_host_ip_records_name_and_address_together_or_as_two_hashed_lines() -> None:
    assert _decide("", NAMED).record == ("build.example,198.51.100.7",)
    assert _decide("", NAMED, hashed=True).record == ("build.example", "198.51.100.7")
    assert _decide("", NAMED_2222).record == ("[build.example]:2222,[198.51.100.7]:2222",)


def test_check_host_ip_adds_the_address_to_a_known_name_even_without_accept_new() -> None:
    decision = _decide("build.example {key}\n", NAMED, accept_new=False)
    assert (decision.status, decision.accepted, decision.record) == ("known", True, ("198.51.100.7",))
    # ... but never to a file it may not write, and never when the address is already there.
    assert _decide("build.example {key}\n", NAMED, can_record=False).record == ()
    assert _decide("build.example {key}\n198.51.100.7 {key}\n", NAMED).record == ()


def test_check_host_ip_warns_when_the_address_holds_another_key_but_decides_by_the_name() -> None:
    decision = _decide("build.example {key}\n198.51.100.7 {other}\n", NAMED)
    assert decision.accepted and decision.record == ()
    assert decision.ip_differs is not None and decision.ip_differs.line_number == 2


def test_check_host_ip_is_off_for_loopback_a_proxy_or_a_name_that_is_the_address() -> None:
    for target in (
        HostKeyTarget("build.example", 22, "127.0.0.1", check_host_ip=True),
        HostKeyTarget("build.example", 22, "", check_host_ip=True, proxied=True),
        HostKeyTarget("198.51.100.7", 22, "198.51.100.7", check_host_ip=True),
        # [addr]:port differs from the name, but OpenSSH's retry without the port turns CheckHostIP off.
        HostKeyTarget("198.51.100.7", 2222, "198.51.100.7", check_host_ip=True),
    ):
        assert _decide("", target).record == (target.name,), target


def test_a_non_22_port_falls_back_to_the_entry_without_port_only_when_it_holds_this_key() -> None:
    target = HostKeyTarget("198.51.100.7", 2222, "198.51.100.7")
    assert _decide("198.51.100.7 {key}\n", target, accept_new=False).accepted
    assert _decide("198.51.100.7 {key}\n", target).record == ()
    other = _decide("198.51.100.7 {other}\n", target)
    assert (other.status, other.accepted, other.record) == ("new", True, ("[198.51.100.7]:2222",))
    assert not _decide("198.51.100.7 {other}\n", target, accept_new=False).accepted
    # With a [host]:port entry of its own, the plain entry is not consulted: another key there is CHANGED.
    changed = _decide("198.51.100.7 {key}\n[198.51.100.7]:2222 {other}\n", target)
    assert (changed.status, changed.accepted) == ("changed", False)
    assert changed.offending is not None and changed.offending.line_number == 2


def test_a_host_key_alias_is_the_only_name_looked_up_and_recorded_lowercased() -> None:
    target = HostKeyTarget("198.51.100.7", 2222, "198.51.100.7", alias="Build.Example")
    assert not _decide("198.51.100.7 {key}\n[198.51.100.7]:2222 {key}\n", target, accept_new=False).accepted
    assert _decide("", target).record == ("build.example",)
    assert _decide("build.example {key}\n", target, accept_new=False).accepted


def test_changed_and_revoked_are_refused_with_or_without_accept_new() -> None:
    for accept_new in (True, False):
        changed = _decide("198.51.100.7 {other}\n", HostKeyTarget("198.51.100.7", 22, "198.51.100.7"),
                          accept_new=accept_new)
        assert (changed.status, changed.accepted, changed.record) == ("changed", False, ())
        revoked = _decide("198.51.100.7 {key}\n@revoked * {key}\n", HostKeyTarget("198.51.100.7", 22, "198.51.100.7"),
                          accept_new=accept_new)
        assert (revoked.status, revoked.accepted) == ("revoked", False)
        assert revoked.offending is not None and revoked.offending.marker == "revoked"


def test_a_key_revoked_for_the_name_without_port_is_refused_too_stricter_than_openssh() -> None:
    target = HostKeyTarget("198.51.100.7", 2222, "198.51.100.7")
    decision = _decide("@revoked 198.51.100.7 {key}\n", target)
    assert (decision.status, decision.accepted) == ("revoked", False)
    assert trusted_without_question(target, _known("198.51.100.7 {key}\n@revoked 198.51.100.7 {key}\n")) == []


def test_unknown_without_a_file_to_record_in_or_with_an_unrecordable_name_is_refused() -> None:
    assert not _decide("", NAMED, can_record=False).accepted
    assert not _decide("", HostKeyTarget("odd*name", 22, "198.51.100.7")).accepted


def test_trusted_without_question_are_exactly_the_keys_decided_known() -> None:
    texts = ["", "198.51.100.7 {key}\n", "198.51.100.7 {other}\n", "[198.51.100.7]:2222 {other}\n",
             "198.51.100.7 {key}\n[198.51.100.7]:2222 {other}\n", "@revoked 198.51.100.7 {key}\n198.51.100.7 {key}\n"]
    for port in (22, 2222):
        target = HostKeyTarget("198.51.100.7", port, "198.51.100.7")
        for text in texts:
            known = _known(text)
            for key in (KEY, OTHER):
                trusted = any(k.public_data == key.public_data for k in trusted_without_question(target, known))
                decision = decide_host_key(key, target, known, accept_new=False, can_record=True, hash_names=False)
                assert trusted == decision.accepted, (port, text, key is KEY)


def test_hashed_names_are_openssh_hmac_sha1_and_match_when_read_back() -> None:
    salt = bytes(range(20))
    expected = hmac.new(salt, b"[198.51.100.7]:2222", hashlib.sha1).digest()
    assert hash_name("[198.51.100.7]:2222", salt) == (
        f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(expected).decode()}")
    line = known_hosts_line("[198.51.100.7]:2222", KEY, hashed=True)
    assert line.startswith("|1|") and line.endswith(f" {_text(KEY)}\n")
    (entry,) = parse_known_hosts(line, FILE)
    assert entry.matches("[198.51.100.7]:2222") and not entry.matches("198.51.100.7")
    assert known_hosts_line("Build.Example", KEY, hashed=False) == f"build.example {_text(KEY)}\n"


def test_unusable_lines_are_skipped_like_openssh_and_line_numbers_kept() -> None:
    text = "# comment\n\n@bogus host {key}\nhost not-a-key\n|1|bad|hash {key}\nhost {key}\n"
    (entry,) = parse_known_hosts(text.format(key=_text(KEY)), FILE)
    assert (entry.line_number, entry.where) == (6, f"{FILE}:6")


def test_append_adds_a_missing_final_newline_and_creates_private_files(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "known_hosts"
    append_known_hosts(path, ["a k1\n"])
    assert path.read_text() == "a k1\n" and path.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "dir").stat().st_mode & 0o777 == 0o700
    path.write_text("a k1")
    append_known_hosts(path, ["b k2\n", "c k3\n"])
    assert path.read_text() == "a k1\nb k2\nc k3\n"


def test_missing_files_hold_nothing_and_unreadable_ones_are_named(tmp_path: Path) -> None:
    assert read_known_hosts_files([tmp_path / "absent"]) == KnownHosts()
    with pytest.raises(Exception, match=f"cannot read known_hosts file {tmp_path}"):
        read_known_hosts_files([tmp_path])  # a directory: IsADirectoryError
