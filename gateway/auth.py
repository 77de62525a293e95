"""API keys: ``Authorization: Bearer <key>``.

With no key configured the gateway serves loopback clients only (and refuses to bind
anything else, see ``check_bind``). Comparisons are constant-time; keys never reach logs.
"""

from __future__ import annotations

import hmac
import ipaddress

from fastapi import Request

from gateway.errors import OpenAIError
from layers.config import Settings
from layers.store.hosts import PREFIX as HOST_KEY_PREFIX


class KeyRing:
    def __init__(self, settings: Settings) -> None:
        self.keys: list[bytes] = [k.encode() for k in settings.gateway.resolved_api_keys()]
        admin = settings.gateway.resolved_admin_key()
        self.admin: bytes | None = admin.encode() if admin else None
        self.public_models = settings.gateway.public_models

    @property
    def open_to_loopback(self) -> bool:
        return not self.keys

    def is_key(self, presented: bytes) -> bool:
        # Check every key (no early exit) so timing does not reveal which prefix matched.
        found = False
        for key in self.keys:
            found |= hmac.compare_digest(presented, key)
        if self.admin is not None:
            found |= hmac.compare_digest(presented, self.admin)
        return found

    def is_admin(self, presented: bytes) -> bool:
        return self.admin is not None and hmac.compare_digest(presented, self.admin)


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_bind(settings: Settings) -> str | None:
    """The reason the gateway must not start, or None."""
    if not settings.gateway.resolved_api_keys() and not is_loopback(settings.gateway.host):
        return (
            f"gateway.host: binding {settings.gateway.host} without an API key would open the "
            "sysadmin to the network; set gateway.api_keys_file (or bind 127.0.0.1)"
        )
    return None


def _bearer(request: Request) -> bytes | None:
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip().encode()


def _keyring(request: Request) -> KeyRing:
    ring: KeyRing = request.app.state.gw.keys
    return ring


def authenticate(request: Request, *, admin: bool = False) -> None:
    ring = _keyring(request)
    presented = _bearer(request)
    if admin:
        if ring.admin is None:
            if ring.open_to_loopback and is_loopback(request.client.host if request.client else None):
                return
            raise OpenAIError(
                403, "no admin key is configured (gateway.admin_key_file)", code="admin_disabled"
            )
        if presented is None:
            raise OpenAIError(401, "this route needs the admin key", code="missing_api_key")
        if not ring.is_admin(presented):
            if not ring.is_key(presented):
                # Not a key at all: unauthenticated (401), as on every other route.
                raise OpenAIError(401, "invalid API key", code="invalid_api_key")
            raise OpenAIError(403, "this route needs the admin key", code="admin_key_required")
        return
    if ring.open_to_loopback:
        if is_loopback(request.client.host if request.client else None):
            return
        raise OpenAIError(403, "no API key configured: loopback clients only", code="loopback_only")
    if presented is None:
        raise OpenAIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            code="missing_api_key",
        )
    if not ring.is_key(presented):
        raise OpenAIError(401, "invalid API key", code="invalid_api_key")


async def _host_of(request: Request, presented: bytes | None) -> str | None:
    """The fleet host whose key was presented (layers/store/hosts.py), or None."""
    if presented is None or not presented.startswith(HOST_KEY_PREFIX.encode()):
        return None
    from gateway.state import host_keys

    return await (await host_keys(request.app.state.gw)).lookup(presented.decode(errors="replace"))


async def require_key(request: Request) -> None:
    """Dependency: any configured API key (or the admin key). A host key is refused
    here (403): it may post its host's events and take its host's actions, nothing else."""
    try:
        authenticate(request)
    except OpenAIError as exc:
        if exc.status == 401 and await _host_of(request, _bearer(request)) is not None:
            raise OpenAIError(403, "a host key may post its host's events and take its "
                              "host's actions only (docs/fleet.md)",
                              code="host_key_scope") from None
        raise


async def require_key_or_host(request: Request) -> None:
    """Dependency: an API key, or a fleet host's key — then ``request.state.host`` names
    the host it is scoped to (None for every other key)."""
    request.state.host = None
    try:
        authenticate(request)
    except OpenAIError as exc:
        if exc.status != 401:
            raise
        host = await _host_of(request, _bearer(request))
        if host is None:
            raise
        request.state.host = host


async def require_host(request: Request) -> str:
    """Dependency: a fleet host's key only (the agent routes); returns its host."""
    host = await _host_of(request, _bearer(request))
    if host is None:
        if _bearer(request) is None:
            raise OpenAIError(401, "missing host key: send 'Authorization: Bearer <key>'",
                              code="missing_api_key")
        raise OpenAIError(401, "invalid host key (revoked, or not a host key)",
                          code="invalid_api_key")
    request.state.host = host
    return host


async def require_admin(request: Request) -> None:
    """Dependency: the admin key (a host key is refused with 403: hosts approve nothing)."""
    try:
        authenticate(request, admin=True)
    except OpenAIError as exc:
        if exc.status == 401 and await _host_of(request, _bearer(request)) is not None:
            raise OpenAIError(403, "this route needs the admin key; a host key approves "
                              "nothing", code="admin_key_required") from None
        raise


async def require_key_for_models(request: Request) -> None:
    """Dependency for the model list, which may be configured public."""
    if not _keyring(request).public_models:
        authenticate(request)


def key_name(request: Request) -> str:
    """Who sent an authenticated request, as the audit log records it: ``admin`` (the
    admin key), ``key`` (an API key), or ``loopback`` (no keys configured). Keys are
    never written down."""
    ring = _keyring(request)
    presented = _bearer(request)
    if presented is not None and ring.is_admin(presented):
        return "admin"
    return "key" if presented is not None and ring.is_key(presented) else "loopback"
