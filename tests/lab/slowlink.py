"""The lab's side of the slow link (`meshtui/slowlink.py`): reach namespace hosts through relays.

The relay itself lives in the package (`meshtui bench --rtt` uses it at run time); this module rewrites a lab
inventory and known_hosts so the named hosts are reached through their links, and starts one link per host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from meshtui.slowlink import LinkShape, SlowLink

__all__ = ["LinkShape", "SlowLink", "inventory_through", "known_hosts_through", "start_links"]


def inventory_through(inventory_toml: str, links: Mapping[str, SlowLink], known_hosts_in: str,
                      known_hosts_out: str) -> str:
    """Rewrite a lab inventory so the named hosts are reached through their links.

    Each host's `address`/`port` become the link's 127.0.0.1:<port>, and the host's key is recorded for that
    address in a copy of the lab's known_hosts (the key is the host's; only the route changed).
    """
    text = inventory_toml.replace(known_hosts_in, known_hosts_out)
    lines: list[str] = []
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("name = "):
            current = line.split("=", 1)[1].strip().strip('"')
        link = links.get(current) if current is not None else None
        if link is not None and line.startswith("address = "):
            line = 'address = "127.0.0.1"'
        if link is not None and line.startswith("port = "):
            line = f"port = {link.port}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def known_hosts_through(known_hosts: str, addresses: Mapping[str, str], links: Mapping[str, SlowLink]) -> str:
    """known_hosts text with each linked host's key also under `[127.0.0.1]:<link port>`."""
    extra = []
    for line in known_hosts.splitlines():
        pattern, _, key = line.partition(" ")
        for name, link in links.items():
            if pattern == addresses[name]:
                extra.append(f"[127.0.0.1]:{link.port} {key}")
    return known_hosts + "".join(f"{line}\n" for line in extra)


def start_links(targets: Iterable[tuple[str, str]], shape: LinkShape, seed: int = 0) -> dict[str, SlowLink]:
    """One started link per (name, address) to that address's sshd (port 22)."""
    links: dict[str, SlowLink] = {}
    for i, (name, address) in enumerate(targets):
        link = SlowLink((address, 22), shape, seed=seed + i)
        link.start()
        links[name] = link
    return links
