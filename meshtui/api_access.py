"""Who may use the API: the key, loopback-only serving without one, and the checks made on each request's headers.

Pure but for `binds_loopback_only` (it resolves a name) and `resolve_api_key` (it reads the key file).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from meshtui.api_http import Request
from meshtui.api_openai import ApiError
from meshtui.errors import InventoryError

API_KEY_ENV = "MESHTUI_API_KEY"


def is_loopback(host: str) -> bool:
    """Whether a Host or Origin header names this machine (browsers resolve *.localhost to loopback)."""
    host = host.strip("[]").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost, or empty ("all interfaces")
        return False


def binds_loopback_only(host: str) -> bool:
    """Whether listening on `host` listens on loopback addresses alone: a name is resolved, and every address
    it resolves to must be loopback (a `*.localhost` or `localhost` that /etc/hosts maps elsewhere is not)."""
    name = host.strip("[]")
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:  # a name: what it resolves to decides
        pass
    if not name:
        return False  # all interfaces
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # does not resolve: start() will say so
        return False
    addresses = {str(info[4][0]) for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)


def resolve_api_key(api_key: str | None, api_key_file: Path | None = None) -> str | None:
    """--api-key, else --api-key-file's first line, else $MESHTUI_API_KEY; empty means none.

    A file or the environment keeps the key out of `ps`.
    """
    if api_key:
        return api_key
    if api_key_file is not None:
        try:
            text = api_key_file.expanduser().read_text(encoding="utf-8")
        except (OSError, UnicodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else err
            raise InventoryError(f"--api-key-file {api_key_file}: cannot read it: {reason}") from err
        lines = text.strip().splitlines()
        key = lines[0].strip() if lines else ""
        if not key:
            raise InventoryError(f"--api-key-file {api_key_file}: the file holds no key")
        return key
    return os.environ.get(API_KEY_ENV) or None


def check_api_options(host: str, api_key: str | None) -> None:
    if not binds_loopback_only(host) and not api_key:
        raise InventoryError(f"--api-host {host} would serve the model beyond this machine without a key; "
                             f"pass --api-key KEY (or set {API_KEY_ENV})")



def authorize(request: Request, api_key: str | None) -> None:
    """Raise the 401 or 403 a request gets; checked as soon as its headers are in, before its body is read."""
    if api_key is None:
        # No key means loopback only. Refuse what a web page could send from a browser on this machine:
        # a foreign Origin (cross-site requests) or Host (DNS rebinding).
        for header in ("host", "origin"):
            value = request.headers.get(header)
            name = urlsplit(value if header == "origin" else f"//{value}").hostname if value else None
            if value and not is_loopback(name or ""):
                raise ApiError(403, f"{header.title()} {value} is refused: without an API key only local "
                                    f"clients are served", type="permission_error", code="forbidden")
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    challenge = [("WWW-Authenticate", "Bearer")]
    if not given:
        raise ApiError(401, "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.",
                       code="invalid_api_key", headers=challenge)
    matches = hmac.compare_digest(token.strip().encode(), api_key.encode())
    if scheme.lower() != "bearer" or not matches:
        raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge)
