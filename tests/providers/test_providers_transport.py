"""KeepAliveTransport against small scripted HTTP servers on loopback, some of them hostile.

Each server is a real asyncio TCP (or TLS) server whose handler writes exactly the bytes a test
needs: keep-alive, chunked bodies, truncated bodies, a close mid-body, slow heads.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import ipaddress
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import pytest

from tests.providers.conftest import SECRET, ClientFactory
from vapora.errors import ProviderTimeout, ProviderUnavailable
from vapora.providers import KeepAliveTransport, ProviderRequest, upper_bound_usage

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {"use_uvloop": False}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, bool]]:
    """Both loops vapora's processes may run on (``vapora.eventloop``)."""
    if request.param[1]["use_uvloop"]:
        pytest.importorskip("uvloop")
    return request.param  # type: ignore[no-any-return]


class Server:
    """A loopback server running ``handler`` once per connection; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.disconnections = 0
        self.url = ""

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.disconnections += 1
            writer.close()


@asynccontextmanager
async def serving(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    server = Server(handler)
    listener = await asyncio.start_server(server._serve, "127.0.0.1", 0, ssl=tls)
    port = listener.sockets[0].getsockname()[1]
    server.url = f"{'https' if tls else 'http'}://{'localhost' if tls else '127.0.0.1'}:{port}"
    try:
        yield server
    finally:
        listener.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request's head and body (by its Content-Length)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def answer(body: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 200 OK", b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Keep-alive: answer every request on the connection with its own body."""
    while True:
        _, body = await read_request(reader)
        writer.write(answer(body))
        await writer.drain()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=KeepAliveTransport(), timeout=2.0) as client:
        yield client


async def test_keep_alive_reuses_one_connection(http: httpx.AsyncClient) -> None:
    async with serving(echo_forever) as server:
        for n in range(5):
            response = await http.post(server.url + "/echo", content=b"call %d" % n)
            assert (response.status_code, response.content) == (200, b"call %d" % n)

    assert server.connections == 1


async def test_a_chunked_body_is_streamed_as_it_arrives(http: httpx.AsyncClient) -> None:
    second = asyncio.Event()

    async def chunked(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n")
        await second.wait()  # the client must have "hello" before the rest is written
        writer.write(b"6\r\n world\r\n0\r\ntrailer: x\r\n\r\n")
        await echo_forever(reader, writer)

    async with serving(chunked) as server:
        received = []
        async with http.stream("POST", server.url, content=b"x") as response:
            async for data in response.aiter_bytes():
                received.append(data)
                second.set()
        again = await http.post(server.url, content=b"next")

    assert b"".join(received) == b"hello world" and received[0] == b"hello"
    assert again.content == b"next" and server.connections == 1


async def test_a_truncated_body_fails_and_its_connection_is_not_reused(
    http: httpx.AsyncClient,
) -> None:
    async def truncated(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if truncated.calls == 0:  # type: ignore[attr-defined]
            truncated.calls += 1  # type: ignore[attr-defined]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly this much")
            return  # closes the connection 86 bytes short
        writer.write(answer(b"whole"))
        await echo_forever(reader, writer)

    truncated.calls = 0  # type: ignore[attr-defined]
    async with serving(truncated) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(server.url, content=b"x")
        response = await http.post(server.url, content=b"x")

    assert response.content == b"whole" and server.connections == 2


async def test_a_close_mid_chunked_body_fails_the_stream(http: httpx.AsyncClient) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n3\r\nwo")

    async with serving(cut) as server:
        received = []
        with pytest.raises(httpx.RemoteProtocolError):
            async with http.stream("POST", server.url, content=b"x") as response:
                async for data in response.aiter_bytes():
                    received.append(data)

    assert b"".join(received).startswith(b"hello")


@pytest.mark.parametrize("stage", ["head", "body"])
async def test_a_slow_server_times_out_on_read(stage: str) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if stage == "body":
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf")
        await asyncio.sleep(5)

    async with (
        serving(slow) as server,
        httpx.AsyncClient(transport=KeepAliveTransport(), timeout=0.2) as http,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(httpx.ReadTimeout):
            await http.post(server.url, content=b"x")

    assert loop.time() - started < 2


async def test_a_refused_connection_is_a_connect_error(http: httpx.AsyncClient) -> None:
    async with serving(echo_forever) as server:
        url = server.url
    with pytest.raises(httpx.ConnectError):
        await http.post(url, content=b"x")


async def test_connection_close_and_http_1_0_bodies_are_not_kept(
    http: httpx.AsyncClient,
) -> None:
    async def closing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/close" in head:
            writer.write(answer(b"closing", b"connection: close"))
        else:  # HTTP/1.0 without a length: the body ends when the connection does
            writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")
        await writer.drain()

    async with serving(closing) as server:
        first = await http.post(server.url + "/close", content=b"x")
        second = await http.post(server.url + "/old", content=b"x")
        third = await http.post(server.url + "/close", content=b"x")

    assert (first.content, second.content, third.content) == (
        b"closing",
        b"until the end",
        b"closing",
    )
    assert server.connections == 3


async def test_a_connection_the_server_closed_while_idle_is_replaced(
    http: httpx.AsyncClient,
) -> None:
    async def one_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _, body = await read_request(reader)
        writer.write(answer(body))  # keep-alive promised, then closed while idle
        await writer.drain()

    async with serving(one_answer) as server:
        assert (await http.post(server.url, content=b"a")).content == b"a"
        await asyncio.sleep(0.05)  # the close reaches the client's idle connection
        assert (await http.post(server.url, content=b"b")).content == b"b"

    assert server.connections == 2


async def test_interim_answers_and_bodiless_answers(http: httpx.AsyncClient) -> None:
    async def varied(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head, body = await read_request(reader)
            if head.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n")
            elif b"/empty" in head:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n" + answer(body))
            await writer.drain()

    async with serving(varied) as server:
        assert (await http.post(server.url, content=b"after 100")).content == b"after 100"
        head = await http.head(server.url)
        empty = await http.post(server.url + "/empty", content=b"x")
        last = await http.post(server.url, content=b"still one connection")

    assert head.headers["content-length"] == "1000" and head.content == b""
    assert empty.status_code == 204 and empty.content == b""
    assert last.content == b"still one connection" and server.connections == 1


async def test_a_compressed_body_is_decoded_by_httpx(http: httpx.AsyncClient) -> None:
    text = b"data: " + b"x" * 2000 + b"\n\n"

    async def gzipped(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(answer(gzip.compress(text), b"content-encoding: gzip"))
        await writer.drain()

    async with serving(gzipped) as server:
        response = await http.post(server.url, content=b"x")

    assert response.content == text


async def test_a_malformed_answer_is_a_protocol_error(http: httpx.AsyncClient) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 OK-ish\r\n\r\n")
        await writer.drain()

    async with serving(garbage) as server:
        with pytest.raises(httpx.RemoteProtocolError):
            await http.post(server.url, content=b"x")


async def test_a_full_pool_times_out_then_frees_when_a_body_is_read() -> None:
    transport = KeepAliveTransport(max_connections=1)
    timeout = httpx.Timeout(2.0, pool=0.2)
    async with (
        serving(echo_forever) as server,
        httpx.AsyncClient(transport=transport, timeout=timeout) as http,
    ):
        held = await http.send(http.build_request("POST", server.url, content=b"held"), stream=True)
        with pytest.raises(httpx.PoolTimeout):
            await http.post(server.url, content=b"waits")
        await held.aread()  # the body read to its end returns the connection to the pool
        assert (await http.post(server.url, content=b"now")).content == b"now"

    assert server.connections == 1


async def test_a_stream_left_early_closes_its_connection(http: httpx.AsyncClient) -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/endless" not in head:
            writer.write(answer(b"fine"))
            await echo_forever(reader, writer)
            return
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        while True:
            writer.write(b"4\r\ndata\r\n")
            await writer.drain()
            await asyncio.sleep(0.01)

    async with serving(endless) as server:
        async with http.stream("POST", server.url + "/endless", content=b"x") as response:
            async for _ in response.aiter_bytes():
                break
        assert (await http.post(server.url, content=b"x")).content == b"fine"

    assert server.connections == 2


async def test_a_cancelled_request_frees_its_connection_slot() -> None:
    async def slow_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"/slow" in head:
            await asyncio.sleep(5)
        writer.write(answer(b"fast"))
        await echo_forever(reader, writer)

    transport = KeepAliveTransport(max_connections=1)
    async with (
        serving(slow_first) as server,
        httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(2.0, pool=0.5)) as http,
    ):
        with anyio.move_on_after(0.1) as scope:  # as the clients' time limits cancel a call
            await http.post(server.url + "/slow", content=b"x")
        response = await http.post(server.url + "/fast", content=b"x")

    assert scope.cancelled_caught and response.content == b"fast"
    assert server.connections == 2  # the cancelled call's connection was not reused


async def test_closing_the_transport_closes_idle_and_then_busy_connections() -> None:
    async with serving(echo_forever) as server:
        http = httpx.AsyncClient(transport=KeepAliveTransport())
        busy = await http.send(http.build_request("POST", server.url, content=b"A"), stream=True)
        assert (await http.post(server.url, content=b"B")).content == b"B"  # a 2nd, now idle
        await http.aclose()
        await asyncio.sleep(0.05)
        after_close = server.disconnections
        assert await busy.aread() == b"A"  # its answer done, the busy one is closed too
        await asyncio.sleep(0.05)

    assert (server.connections, after_close, server.disconnections) == (2, 1, 2)


# --- TLS --------------------------------------------------------------------------------------


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


async def test_tls_verifies_the_server_and_keeps_the_connection(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    trusting = ssl.create_default_context(cafile=str(cert))

    async with serving(echo_forever, tls=server_tls) as server:
        async with httpx.AsyncClient(transport=KeepAliveTransport(ssl_context=trusting)) as http:
            first = await http.post(server.url, content=b"secret one")
            second = await http.post(server.url, content=b"secret two")
        # The default context (certifi's CAs) does not trust a self-signed certificate.
        async with httpx.AsyncClient(transport=KeepAliveTransport()) as http:
            with pytest.raises(httpx.ConnectError):
                await http.post(server.url, content=b"x")

    assert (first.content, second.content) == (b"secret one", b"secret two")
    assert server.connections == 1  # one kept-alive TLS connection (no handshake, no handler)


# --- through a provider client: errors keep their classes -------------------------------------


async def test_transport_failures_keep_their_provider_error_classes(
    client_for: ClientFactory,
) -> None:
    async def hostile(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        if b"slow" in head:
            await asyncio.sleep(5)
        writer.write(b'HTTP/1.1 200 OK\r\ncontent-length: 500\r\n\r\n{"id": ')

    async with serving(hostile) as server:
        client = client_for("openai", base_url=server.url + "/v1", timeout=0.3)
        with pytest.raises(ProviderUnavailable) as cut:
            await client.complete(ProviderRequest(prompt="hi"))
        slow = client_for("openai", base_url=server.url + "/slow", timeout=0.3)
        with pytest.raises(ProviderTimeout) as late:
            await slow.complete(ProviderRequest(prompt="hi"))

    # A 200 whose body was cut: the provider made (and bills) the whole answer, whose usage was
    # in the part not received: the attempt's upper bound. No answer in time to a request sent:
    # the provider goes on with it and bills it, what it bills unknown: the upper bound too.
    assert type(cut.value) is ProviderUnavailable and cut.value.error_type == "answer_cut"
    assert cut.value.usage == upper_bound_usage(ProviderRequest(prompt="hi"))
    assert late.value.error_type == "timeout"
    assert late.value.usage == upper_bound_usage(ProviderRequest(prompt="hi"))
    assert SECRET not in str(cut.value) and SECRET not in repr(cut.value)
