"""Reach an inventory's hosts through slow-link relays (`meshtui/slowlink.py`) for the bench's round-trip sweep.

Each host's SSH target (after ~/.ssh/config: HostName and Port) gets a relay on 127.0.0.1, and the host is
reached as `meshtui-link-<name>` through an ssh config written for the run: HostName 127.0.0.1, the relay's
port, and `HostKeyAlias` set to the name its key is known under, so the key is checked against the user's
known_hosts exactly as without the relay (only the route changed). Hosts behind ProxyJump or ProxyCommand
cannot be relayed this way and are refused by name.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import asyncssh

from meshtui.errors import InventoryError
from meshtui.hostkeys import put_host_port
from meshtui.inventory import HostSpec, Inventory
from meshtui.slowlink import LinkProcess
from meshtui.ssh import resolve_host, ssh_config_files

LINK_PREFIX = "meshtui-link-"


@dataclass(frozen=True)
class LinkTarget:
    """Where one host's SSH really goes, and the name its host key is known under."""

    host: str
    address: str
    port: int
    key_name: str  # HostKeyAlias for the relayed connection
    user: str | None
    identity_files: tuple[str, ...]


def link_targets(inventory: Inventory) -> list[LinkTarget]:
    config_files = ssh_config_files(inventory.ssh)
    targets = []
    for spec in inventory.hosts:
        resolved = resolve_host(spec, inventory.ssh, config_files).target
        if resolved.proxied:
            raise InventoryError(f"{spec.name}: --rtt cannot put a slow link in front of a host reached through "
                                 "ProxyJump or ProxyCommand")
        options = asyncssh.SSHClientConnectionOptions(
            host=spec.address, port=spec.port or (), username=spec.user or (),
            config=[str(p) for p in config_files], known_hosts=None, client_keys=None, agent_path=None)
        identities = options.config.get("IdentityFile")
        targets.append(LinkTarget(
            spec.name, resolved.hostname, resolved.port,
            resolved.alias or put_host_port(resolved.hostname, resolved.port),
            spec.user or options.username,
            tuple(str(i) for i in identities) if isinstance(identities, list) and not spec.identity_file else ()))
    return targets


def ssh_config_through(targets: Sequence[LinkTarget], ports: Sequence[int]) -> str:
    """One `Host meshtui-link-<name>` block per host, to its relay, keys checked under the host's own name."""
    blocks = []
    for target, port in zip(targets, ports, strict=True):
        lines = [f"Host {LINK_PREFIX}{target.host}", "    HostName 127.0.0.1", f"    Port {port}",
                 f"    HostKeyAlias {target.key_name}"]
        if target.user:
            lines.append(f"    User {target.user}")
        lines += [f"    IdentityFile {path}" for path in target.identity_files]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) + "\n"


def inventory_through(inventory: Inventory, targets: Sequence[LinkTarget], config_path: Path) -> Inventory:
    """The inventory with every host reached through its relay (the config at `config_path` read first)."""
    by_name = {t.host: t for t in targets}

    def relayed(spec: HostSpec) -> HostSpec:
        return replace(spec, address=f"{LINK_PREFIX}{spec.name}", port=None, user=spec.user or by_name[spec.name].user)

    config_files = (config_path, *ssh_config_files(inventory.ssh))
    return replace(inventory, hosts=tuple(relayed(h) for h in inventory.hosts),
                   ssh=replace(inventory.ssh, config_files=config_files))


@contextlib.contextmanager
def slow_links(inventory: Inventory, folder: Path, rtt_ms: float = 0.0,
               extra: Sequence[tuple[str, int]] = ()) -> Iterator[tuple[Inventory, LinkProcess, list[int]]]:
    """Relays in front of every host (one process), the inventory that reaches the hosts through them, and the
    127.0.0.1 ports of relays to the `extra` targets (plain TCP stages) on the same links."""
    targets = link_targets(inventory)
    with LinkProcess([*((t.address, t.port) for t in targets), *extra], rtt_ms=rtt_ms) as links:
        config_path = folder / "ssh_config"
        config_path.write_text(ssh_config_through(targets, links.ports[:len(targets)]))
        yield inventory_through(inventory, targets, config_path), links, links.ports[len(targets):]
