"""Who the client is: the peer address, or X-Forwarded-For's only from a trusted proxy.

IDV_TRUSTED_PROXIES lists the proxies (addresses or CIDR networks, comma-separated; none by
default). `ClientAddress` sets the request's client address once, for every route, the
throttles and the logs: when the peer is a trusted proxy, the rightmost X-Forwarded-For entry
that is not itself a trusted proxy (what the outermost trusted proxy saw), else the peer; and
X-Forwarded-Proto (https behind a TLS proxy) likewise. A client can put anything into these
headers; only what trusted proxies appended is believed.
uvicorn's own X-Forwarded-For handling is off (service/server.py), so this is the one place.
"""
from __future__ import annotations

import ipaddress


class TrustedProxies:
    def __init__(self, spec: str = ""):
        self.networks = []
        for part in (spec or "").split(","):
            part = part.strip()
            if not part:
                continue
            try:
                self.networks.append(ipaddress.ip_network(part, strict=False))
            except ValueError as exc:
                raise ValueError(f"IDV_TRUSTED_PROXIES: {part!r} is not an address or a network") from exc

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address((address or "").strip())
        except ValueError:
            return False
        return any(ip in net for net in self.networks)

    def client(self, peer: str | None, forwarded_for: list[str]) -> str | None:
        """The client's address, given the peer's and the X-Forwarded-For header values."""
        if not self.networks or not self.trusts(peer):
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self.trusts(hop):
                try:
                    return str(ipaddress.ip_address(hop))
                except ValueError:
                    return peer   # not an address: a trusted proxy would not have written it
        return hops[0] if hops else peer


class ClientAddress:
    """ASGI middleware: scope["client"] becomes the client's address (see the module doc)."""

    def __init__(self, app, proxies: TrustedProxies) -> None:
        self.app = app
        self.proxies = proxies

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.proxies and scope.get("client") and self.proxies.trusts(scope["client"][0]):
            peer, port = scope["client"]
            headers = scope.get("headers", [])
            forwarded = [value.decode("latin-1") for name, value in headers if name.lower() == b"x-forwarded-for"]
            protos = [value.decode("latin-1").split(",")[-1].strip().lower() for name, value in headers
                      if name.lower() == b"x-forwarded-proto"]
            scope = {**scope, "client": (self.proxies.client(peer, forwarded), port)}
            if protos and protos[-1] in ("http", "https"):
                scope["scheme"] = protos[-1]
        await self.app(scope, receive, send)
