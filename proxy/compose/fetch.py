"""Fetching V3's result images: only the URLs V3 gave for the task, only from allowed origins
(scheme, host and port), never following a redirect, with a size cap and a timeout.

The allowed origins are the upstream's own and the configured ones. A configured origin named by
a host name must resolve to public addresses only: a name that resolves to a loopback, private or
link-local address is refused (the proxy then connects to the address it checked, so a second
lookup can't answer differently), unless the operator allows private addresses, or named the
address itself (an IP literal, or `localhost`). The upstream's origin is trusted at any address:
it is where the proxy sends its calls anyway.

A FetchError's words end up in a task's `failed_reason`, shown to the client: they name no address
and quote no library. The detail goes to the log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import aiohttp
import structlog
from yarl import URL

from proxy.redact import redact

SCHEMES = ("http", "https")
DEFAULT_PORTS = {"http": 80, "https": 443}
Resolve = Callable[[str, int], Awaitable[list[str]]]
log = structlog.get_logger("proxy")


class FetchError(Exception):
    """Why an image could not be had, in words safe to show a client."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str | None  # None: http or https (a host-only entry)
    host: str  # lower case, IPv6 without brackets
    port: int | None  # None: any port (a host-only entry)
    pinned: bool = False  # the proxy resolves the name itself, checks the addresses, connects to one
    private: bool = False  # loopback, private and link-local addresses are allowed

    def matches(self, url: URL) -> bool:
        return ((url.host or "").lower() == self.host and (self.scheme is None or url.scheme == self.scheme)
                and (self.port is None or url.port == self.port))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme or 'http(s)'}://{host}:{self.port or '*'}"


def parse_origin(text: str) -> Origin:
    """`scheme://host[:port]` (an UPSCALE_PROXY_IMAGE_ORIGINS entry) -> an Origin; ValueError
    saying what is wrong."""
    url = URL(text.strip())
    if url.scheme not in SCHEMES or not url.host:
        raise ValueError(f"{text!r} is not an origin: write scheme://host[:port], scheme http or https")
    if url.path not in ("", "/") or url.query_string or url.fragment or url.user or url.password:
        raise ValueError(f"{text!r} is not an origin: no path, query, fragment or user")
    return Origin(url.scheme, url.host.lower(), url.port)


def parse_host(text: str) -> Origin:
    """`host` or `host:port` (an UPSCALE_PROXY_IMAGE_HOSTS entry): http or https, any port unless
    one is given."""
    url = URL(f"http://{text.strip()}")
    if not url.host or url.path not in ("", "/") or url.query_string or url.user:
        raise ValueError(f"{text!r} is not a host")
    return Origin(None, url.host.lower(), url.explicit_port)


def _named_address(host: str) -> bool:
    """The entry names an address, not a name someone else resolves: the operator meant it."""
    return host == "localhost" or _ip(host)


def _ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AllowedOrigins:
    """Where images may come from: the upstream's origin (trusted at any address) and the
    configured ones."""

    def __init__(self, origins: Iterable[Origin]) -> None:
        self.origins = tuple(origins)

    @classmethod
    def configure(cls, upstream: str | None, origins: Iterable[str] = (), hosts: Iterable[str] = (),
                  private_addresses: bool = False) -> AllowedOrigins:
        """The upstream's base URL, UPSCALE_PROXY_IMAGE_ORIGINS entries, UPSCALE_PROXY_IMAGE_HOSTS
        entries; `private_addresses`: configured names may resolve to private addresses."""
        found = []
        if upstream:  # where the proxy's calls go anyway: aiohttp resolves it, any address
            up = URL(upstream)
            found.append(Origin(up.scheme, (up.host or "").lower(), up.port, pinned=False, private=True))
        for entry in [*map(parse_origin, origins), *map(parse_host, hosts)]:
            named = _named_address(entry.host)
            found.append(Origin(entry.scheme, entry.host, entry.port, pinned=not named,
                                private=named or private_addresses))
        return cls(found)

    def match(self, url: URL) -> Origin | None:
        """The origin `url` is allowed by (the least checked first), or None."""
        hits = [o for o in self.origins if o.matches(url)]
        return min(hits, key=lambda o: (o.pinned, not o.private)) if hits else None

    def allows_host(self, host: str) -> bool:
        return any(o.host == host.lower() for o in self.origins)

    def __str__(self) -> str:
        return ", ".join(map(str, self.origins))


async def _getaddrinfo(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


class ImageFetcher:
    def __init__(self, session: aiohttp.ClientSession, allowed: AllowedOrigins | Iterable[str],
                 max_bytes: int, timeout: float, observe: Callable[[str, float], None] | None = None,
                 resolve: Resolve = _getaddrinfo) -> None:
        """`allowed`: the AllowedOrigins, or entries as in UPSCALE_PROXY_IMAGE_ORIGINS (with a
        scheme) and UPSCALE_PROXY_IMAGE_HOSTS (without). `resolve(host, port)`: the addresses of a
        name (a test may answer for the DNS)."""
        if not isinstance(allowed, AllowedOrigins):
            entries = list(allowed)
            allowed = AllowedOrigins.configure(None, [e for e in entries if "://" in e],
                                               [e for e in entries if "://" not in e])
        self._session = session
        self.allowed = allowed  # where images may come from (the log says it at start)
        self._max = max_bytes
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._observe = observe or (lambda call, seconds: None)
        self._resolve = resolve

    async def fetch(self, url: str) -> bytes:
        started = time.perf_counter()
        try:
            return await self._fetch(URL(url))
        finally:
            self._observe("image", time.perf_counter() - started)

    async def _fetch(self, url: URL) -> bytes:
        if url.scheme not in SCHEMES:
            raise _refused(url, f"image URL scheme {url.scheme!r} refused")
        if url.user is not None or url.password is not None:
            raise _refused(url, "image URL with credentials refused")
        origin = self.allowed.match(url)
        if origin is None:
            if not self.allowed.allows_host(url.host or ""):  # a name is told, an address is not
                host = "(an IP address)" if _ip(url.host or "") else repr(url.host)
                raise _refused(url, f"image host {host} is not allowed (UPSCALE_PROXY_IMAGE_ORIGINS)")
            raise _refused(url, "image URL's scheme or port is not an allowed origin's (UPSCALE_PROXY_IMAGE_ORIGINS)")
        target, extra = url, {}
        if origin.pinned:
            address = await self._address(url, public=not origin.private)
            # connect to the address just checked; the name still goes in Host and TLS
            target = url.with_host(address)
            extra = {"headers": {"Host": url.host_port_subcomponent or url.host},
                     "server_hostname": url.host if url.scheme == "https" else None}
        try:
            async with self._session.get(target, timeout=self._timeout, allow_redirects=False, **extra) as resp:
                if 300 <= resp.status < 400:
                    raise _refused(url, f"image fetch answered HTTP {resp.status} (a redirect is not followed)")
                if resp.status != 200:
                    raise FetchError(f"image fetch answered HTTP {resp.status}")
                if (resp.content_length or 0) > self._max:
                    raise FetchError(f"image is over {self._max} bytes")
                data = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 20):
                    data += chunk
                    if len(data) > self._max:
                        raise FetchError(f"image is over {self._max} bytes")
                return bytes(data)
        except TimeoutError as e:
            log.warning("image fetch failed", url=_loggable(url), detail=redact(f"{type(e).__name__}: {e}"))
            raise FetchError("image fetch failed: no answer in time") from e
        except aiohttp.ClientError as e:  # aiohttp's words name the address: for the log only
            log.warning("image fetch failed", url=_loggable(url), detail=redact(f"{type(e).__name__}: {e}"))
            raise FetchError("image fetch failed: no connection, or it broke") from e

    async def _address(self, url: URL, public: bool) -> str:
        host, port = url.host or "", url.port or DEFAULT_PORTS[url.scheme]
        try:
            addresses = await self._resolve(host, port)
        except OSError as e:
            log.warning("image host not resolved", url=_loggable(url), detail=redact(f"{type(e).__name__}: {e}"))
            raise FetchError("image fetch failed: the image host could not be resolved") from e
        if not addresses or (public and not all(map(_public, addresses))):
            log.warning("image fetch refused: the host resolves to a non-public address", url=_loggable(url),
                        addresses=addresses, setting="UPSCALE_PROXY_IMAGE_PRIVATE_ADDRESSES")
            raise FetchError("image fetch refused: the image host resolves to an address that is not public")
        return addresses[0]


def _refused(url: URL, why: str) -> FetchError:
    log.warning("image fetch refused", url=_loggable(url), why=why)
    return FetchError(why)


def _loggable(url: URL) -> str:
    """The URL without its query (a presigned URL's signature) or credentials."""
    if url.absolute and url.host:
        url = url.with_user(None)
    return str(url.with_query(None).with_fragment(None))
