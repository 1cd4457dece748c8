"""The image fetcher's boundaries: allowed origins (scheme, host and port), no redirects, no private
address behind a configured name, and words for clients that name no address."""

from __future__ import annotations

import aiohttp
import pytest
from aiohttp import web

from proxy.compose.fetch import (
    AllowedOrigins,
    FetchError,
    ImageFetcher,
    parse_host,
    parse_origin,
)
from tests.helpers import closed_port_url, recording_host
from tests.images import encode, pattern

PNG = encode(pattern(8, 8))


@pytest.fixture
async def image_server(aiohttp_server):
    """An image host on loopback: /img.png, /moved (a 302 to `?to=`); `seen` lists (path, Host)."""
    seen: list[tuple[str, str]] = []

    async def img(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Host", "")))
        return web.Response(body=PNG, content_type="image/png")

    async def moved(request: web.Request) -> web.Response:
        seen.append((request.path, request.headers.get("Host", "")))
        raise web.HTTPFound(request.query["to"])

    app = web.Application()
    app.router.add_get("/img.png", img)
    app.router.add_get("/moved", moved)
    server = await aiohttp_server(app)
    server.seen = seen
    return server


def fetcher(session: aiohttp.ClientSession, allowed: AllowedOrigins, **kw) -> ImageFetcher:
    return ImageFetcher(session, allowed, max_bytes=10**6, timeout=5, **kw)


async def test__upstream_origin__is_allowed_and_another_port_on_its_host_is_not(image_server):
    base = str(image_server.make_url("")).rstrip("/")
    other = closed_port_url()  # the same host, another port
    allowed = AllowedOrigins.configure(base)
    async with aiohttp.ClientSession() as session:
        assert await fetcher(session, allowed).fetch(f"{base}/img.png") == PNG
        with pytest.raises(FetchError, match="not an allowed origin.s") as refused:
            await fetcher(session, allowed).fetch(f"{other}/img.png")
        with pytest.raises(FetchError, match="not an allowed origin.s"):
            await fetcher(session, allowed).fetch(f"{base.replace('http:', 'https:')}/img.png")
    assert "127.0.0.1" not in str(refused.value) and other.rsplit(":", 1)[1] not in str(refused.value)


async def test__configured_origin_and_host_entries__are_allowed(image_server):
    base = str(image_server.make_url("")).rstrip("/")
    port = image_server.port
    async with aiohttp.ClientSession() as session:
        for allowed in (AllowedOrigins.configure("https://v3.example", origins=[base]),
                        AllowedOrigins.configure("https://v3.example", hosts=["127.0.0.1"]),
                        AllowedOrigins.configure("https://v3.example", hosts=[f"127.0.0.1:{port}"])):
            assert await fetcher(session, allowed).fetch(f"{base}/img.png") == PNG
        narrow = AllowedOrigins.configure("https://v3.example", hosts=[f"127.0.0.1:{port + 1}"])
        with pytest.raises(FetchError, match="not an allowed origin.s"):
            await fetcher(session, narrow).fetch(f"{base}/img.png")
        with pytest.raises(FetchError, match="image host 'elsewhere.example' is not allowed"):
            await fetcher(session, narrow).fetch("http://elsewhere.example/img.png")


async def test__redirect__is_not_followed(image_server, aiohttp_server):
    canary, canary_hits = await recording_host(aiohttp_server,
                                               lambda _: web.Response(body=PNG, content_type="image/png"))
    canary_url = str(canary.make_url("/img.png"))
    base = str(image_server.make_url("")).rstrip("/")
    allowed = AllowedOrigins.configure(base, origins=[canary_url.rsplit("/", 1)[0]])  # even to an allowed one
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError, match=r"HTTP 302 \(a redirect is not followed\)"):
            await fetcher(session, allowed).fetch(f"{base}/moved?to={canary_url}")
    assert canary_hits == []


async def test__configured_name_resolving_to_loopback__is_refused_before_any_connection(image_server, log_lines):
    resolved: list[str] = []

    async def to_loopback(host: str, port: int) -> list[str]:
        resolved.append(host)
        return ["127.0.0.1"]

    origin = f"http://images.example:{image_server.port}"
    async with aiohttp.ClientSession() as session:
        refused = fetcher(session, AllowedOrigins.configure("https://v3.example", origins=[origin]),
                          resolve=to_loopback)
        with pytest.raises(FetchError, match="not public") as e:
            await refused.fetch(f"{origin}/img.png?signature=s3cr3t")
        assert resolved == ["images.example"] and image_server.seen == []
        assert "127.0.0.1" not in str(e.value)
        logged = next(line for line in log_lines if "non-public" in line["event"])
        assert logged["addresses"] == ["127.0.0.1"] and "s3cr3t" not in log_lines.text  # no presigned query

        # allowed by the operator: fetched from the address checked, under its name
        private = AllowedOrigins.configure("https://v3.example", origins=[origin], private_addresses=True)
        assert await fetcher(session, private, resolve=to_loopback).fetch(f"{origin}/img.png") == PNG
    assert image_server.seen == [("/img.png", f"images.example:{image_server.port}")]


@pytest.mark.parametrize("addresses", [["10.0.0.7"], ["169.254.169.254"], ["::1"], ["::ffff:127.0.0.1"],
                                       ["fe80::1%eth0"], ["93.184.216.34", "192.168.1.2"], []])
async def test__any_non_public_address__refuses_the_name(addresses):
    async def resolve(host: str, port: int) -> list[str]:
        return addresses

    allowed = AllowedOrigins.configure(None, origins=["https://images.example"])
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError, match="not public"):
            await fetcher(session, allowed, resolve=resolve).fetch("https://images.example/a.png")


async def test__unreachable_or_unresolved_image__is_told_without_address_or_library_words(log_lines):
    closed = closed_port_url()

    async def unresolved(host: str, port: int) -> list[str]:
        raise OSError("[Errno -2] Name or service not known")

    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError) as down:
            await fetcher(session, AllowedOrigins.configure(closed)).fetch(f"{closed}/img.png")
        named = AllowedOrigins.configure(None, origins=["http://images.example"])
        with pytest.raises(FetchError) as unknown:
            await fetcher(session, named, resolve=unresolved).fetch("http://images.example/img.png")
    for e in (down.value, unknown.value):
        assert str(e).startswith("image fetch failed")
        assert "127.0.0.1" not in str(e) and "Cannot connect" not in str(e) and "Errno" not in str(e)
    assert "Cannot connect" in log_lines.text  # the detail is for operators


async def test__url_with_credentials_or_another_scheme__is_refused():
    allowed = AllowedOrigins.configure("http://127.0.0.1:9")
    async with aiohttp.ClientSession() as session:
        with pytest.raises(FetchError, match="credentials"):
            await fetcher(session, allowed).fetch("http://user:pw@127.0.0.1:9/img.png")
        with pytest.raises(FetchError, match="scheme"):
            await fetcher(session, allowed).fetch("file:///etc/passwd")


@pytest.mark.parametrize("entry", ["images.example", "ftp://images.example", "https://images.example/path",
                                   "https://user@images.example", "https://images.example/?q=1"])
def test__bad_origin_entry__is_refused(entry):
    with pytest.raises(ValueError, match="not an origin"):
        parse_origin(entry)


def test__entries__parse_to_scheme_host_port():
    assert (o := parse_origin("HTTPS://Images.Example")).scheme == "https" and o.host == "images.example"
    assert o.port == 443 and parse_origin("http://[::1]:8080").host == "::1"
    assert (h := parse_host("cdn.example")).scheme is None and h.port is None
    assert parse_host("cdn.example:8443").port == 8443
    with pytest.raises(ValueError):
        parse_host("cdn.example/path")
