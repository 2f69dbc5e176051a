"""No API key appears in any exception text, repr, traceback or log line (DESIGN §5)."""

from __future__ import annotations

import logging
import traceback

import httpx
import pytest

from tests.providers.conftest import SECRET, ClientFactory, price_of, stub
from vapora.errors import ProviderError
from vapora.providers import ProviderClient, ProviderRequest, make_client
from vapora.providers.base import without_request_text
from vapora.simulator import Simulator

pytestmark = pytest.mark.anyio

KINDS = ["anthropic", "openai", "gemini", "ollama"]
FAILURES = [
    "error-401",  # the simulator quotes the key it was given, as OpenAI does
    "error-400",
    "error-403",
    "error-404",
    "error-429",
    "error-500",
    "error-529",
    "quota",
    "malformed",
    "cut-2",
    "error-after-200",
    "stall-1",
    "hang",
]

STREAM_ONLY = {"error-after-200", "stall-1"}


def _everything_said_about(error: BaseException) -> str:
    """str, repr, message and the full formatted traceback of the error and its causes."""
    parts = ["".join(traceback.format_exception(error))]
    seen: BaseException | None = error
    while seen is not None:
        parts += [str(seen), repr(seen), str(getattr(seen, "message", ""))]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


async def test_the_simulator_really_echoes_the_key(sim: Simulator) -> None:
    """Otherwise the scrubbing test below could not fail."""
    async with httpx.AsyncClient(base_url=sim.base_url) as http:
        response = await http.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {SECRET}"},
            json={"model": "gpt-4o-error-401", "messages": [{"role": "user", "content": "x"}]},
        )
    assert SECRET in response.text


@pytest.mark.parametrize("kind", KINDS)
async def test_no_error_or_log_line_contains_the_key(
    kind: str, client_for: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # every logger, httpx and httpcore included
    said: list[str] = []

    for suffix in FAILURES:
        client = client_for(kind, suffix, api_key=SECRET, timeout=0.3)
        said.append(repr(client))
        for streaming in (True,) if suffix in STREAM_ONLY else (False, True):
            try:
                if streaming:
                    async with client.stream(ProviderRequest(prompt="a b c d")) as stream:
                        async for _ in stream:
                            pass
                else:
                    await client.complete(ProviderRequest(prompt="a b c d"))
            except ProviderError as error:
                said.append(_everything_said_about(error))
            else:
                pytest.fail(f"{kind} {suffix} did not fail")

    logged = [caplog.text] + [record.getMessage() for record in caplog.records]
    assert len(said) == 3 * len(FAILURES) - len(STREAM_ONLY)
    assert any("Incorrect API key" in text or "API key not valid" in text for text in said)
    assert not [text for text in said + logged if SECRET in text]
    assert any("[redacted]" in text for text in said)


@pytest.mark.parametrize("kind", ["anthropic", "openai", "gemini"])
@pytest.mark.parametrize("padded", [SECRET + " ", SECRET + "\n", "\t" + SECRET + "\r\n"])
async def test_a_key_with_surrounding_whitespace_is_sent_trimmed_and_scrubbed(
    kind: str, padded: str, client_for: ClientFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """The server trims a header's value and quotes that back: the exact-match scrub of the key
    as given found nothing, and the whole key reached the event log and the router's log."""
    caplog.set_level(logging.DEBUG)
    client = client_for(kind, "error-401", api_key=padded)
    with pytest.raises(ProviderError) as failed:
        await client.complete(ProviderRequest(prompt="a b c d"))
    said = _everything_said_about(failed.value) + caplog.text
    assert "[redacted]" in said and SECRET not in said and SECRET[:12] not in said


@pytest.mark.parametrize("bad", ["sk-with space", "sk-line\r\nX-Injected: 1", "sk-é"])
async def test_a_key_no_header_can_carry_is_refused_without_quoting_it(
    bad: str, client_for: ClientFactory
) -> None:
    with pytest.raises(ValueError, match="not shown") as refused:
        client_for("openai", api_key=bad)
    assert bad not in str(refused.value) and "sk-" not in str(refused.value)


async def test_a_key_cut_by_the_error_messages_length_is_not_left_half_shown() -> None:
    """A gateway's HTML 401 that echoes the Authorization header across the 500th byte: the body
    was cut before it was scrubbed, and the key's first half, no longer matching, was kept."""
    # The key starts at the body's 464th byte: the old cut at 500 kept 36 of its 38 characters
    # (no longer the key), and the message's own cut at 500 kept its first 11.
    prefix = b"<html><body>" + b"x" * 444 + b" Bearer "
    body = prefix + SECRET.encode() + b"</body></html>"

    answer = (
        b"HTTP/1.1 401 Unauthorized\r\ncontent-type: text/html\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
    )
    said = _everything_said_about(await _failure(answer, "openai"))
    assert "Bearer " in said  # the cut falls inside the key
    assert SECRET[:8] not in said


def _gateway(port: int, kind: str = "anthropic") -> ProviderClient:
    """A client of ``kind`` whose provider is the stub server on ``port``."""
    return make_client(
        name="gateway",
        kind=kind,
        model={"anthropic": "claude-opus-4-5", "openai": "gpt-4o"}[kind],
        price=price_of(kind),
        api_key=SECRET,
        base_url=f"http://127.0.0.1:{port}" + ("/v1" if kind == "openai" else ""),
        timeout=5.0,
    )


async def _failure(answer: bytes, kind: str = "anthropic") -> ProviderError:
    """The error a call to a provider answering ``answer`` raises."""
    async with stub(answer) as port:
        client = _gateway(port, kind)
        try:
            with pytest.raises(ProviderError) as failed:
                await client.complete(ProviderRequest(prompt="a b c d"))
        finally:
            await client.aclose()
    return failed.value


def _json_answer(status: int, body: bytes) -> bytes:
    return (
        b"HTTP/1.1 %d Status\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (status, len(body), body)
    )


@pytest.mark.parametrize("error_type", [SECRET, f"Bearer {SECRET}", "a b c d", "x" * 100])
async def test_an_error_type_that_is_no_identifier_is_not_taken(error_type: str) -> None:
    # The type went unscrubbed to call_failed.error_code, the span's error.type and the
    # metrics' error_type label (and, a new value each time, a label without bound).
    body = b'{"type": "error", "error": {"type": "%s", "message": "no"}}' % error_type.encode()
    failure = await _failure(_json_answer(500, body))
    assert failure.error_type is None
    assert SECRET not in _everything_said_about(failure)


async def test_a_status_line_echoing_the_key_is_not_quoted_even_in_part() -> None:
    # The transport quoted 100 bytes of a malformed status line: the key cut off there no
    # longer matched the scrubbing, and 85 of its characters reached the event log.
    answer = b"HTTP/1.1 2x0 Authorization: Bearer " + SECRET.encode() + b"\r\n\r\n"
    said = _everything_said_about(await _failure(answer))
    assert "malformed status line" in said
    assert not [SECRET[i : i + 8] for i in range(len(SECRET) - 8) if SECRET[i : i + 8] in said]


PROMPT = "Summarise the quarterly numbers for the Zanzibar account"


@pytest.mark.parametrize(
    ("message", "quoted"),
    [
        (f"messages[0].content: invalid value '{PROMPT}'", True),
        (f"prompt too long: {PROMPT[10:50]}...", True),
        ("overloaded, try again later", False),
        # Ordinary words a long prompt shares with the provider's own message are no quote
        # (a first version dropped every context overflow message of a long prompt).
        ("This model's maximum context length is 128000 tokens. However, you requested", False),
    ],
)
def test_a_provider_message_quoting_the_request_is_not_kept(message: str, quoted: bool) -> None:
    error = ProviderError(
        f"claude: HTTP 400 invalid_request_error: {message}",
        provider="claude",
        http_status=400,
        error_type="invalid_request_error",
    )
    essay = "However, you may find the maximum context length of this model is small. " * 50
    kept = without_request_text(error, ["You are terse.", PROMPT, essay])
    assert "Zanzibar" not in kept.message
    if quoted:
        assert kept.message == (
            "claude: HTTP 400 invalid_request_error: the provider's message quoted the "
            "request's text (not kept)"
        )
        assert str(kept) == kept.message
    else:
        assert kept.message.endswith(message)


@pytest.mark.parametrize("variable", ["HTTP_PROXY", "http_proxy", "ALL_PROXY"])
async def test_calls_go_through_the_proxy_the_environment_configures(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The environment's proxy was ignored: calls went straight to the provider, which behind
    # an egress proxy means they failed (and an egress policy was bypassed where they did not).
    body = (
        b'{"model": "llama2", "message": {"role": "assistant", "content": "via the proxy"},'
        b' "done": true, "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 3}'
    )
    answer = _json_answer(200, body)
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    async with stub(answer) as port:
        # A value without a scheme is an http:// proxy, as httpx and curl read it.
        scheme = "" if variable == "ALL_PROXY" else "http://"
        monkeypatch.setenv(variable, f"{scheme}127.0.0.1:{port}")
        client = make_client(
            name="remote",
            kind="ollama",
            model="llama2",
            price=price_of("ollama"),
            base_url="http://ollama.invalid:9",  # no such host: only the proxy answers
            timeout=5.0,
        )
        try:
            done = await client.complete(ProviderRequest(prompt="a b c d"))
        finally:
            await client.aclose()
    assert done.text == "via the proxy"


def test_a_loopback_provider_is_not_proxied_and_a_bad_proxy_is_named(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from vapora.errors import ConfigError
    from vapora.providers.base import default_transport, proxy_for

    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    for local in ("http://localhost:11434", "http://127.0.0.1:8080", "http://[::1]:9"):
        assert proxy_for(local) is None  # a local Ollama went to the corporate proxy
    assert proxy_for("http://ollama.lan:11434") == "http://proxy.corp:3128"
    monkeypatch.setenv("HTTP_PROXY", "gopher://proxy.corp:70")
    with pytest.raises(ConfigError, match="is not one httpx can use"):
        default_transport("http://ollama.lan:11434")


def test_a_whole_short_prompt_quoted_anywhere_and_a_type_quoting_it_are_caught() -> None:
    # A 24-character prompt quoted off the 8-character grid was missed; so was a provider's
    # error "type" that quoted the prompt (refused as a type, it stayed in the message).
    short = "My SSN is 123-45-6789 ok"
    error = ProviderError(
        f"openai: HTTP 400 invalid_request_error: '{short}' is invalid",
        provider="openai",
        http_status=400,
        error_type="invalid_request_error",
    )
    assert "123-45" not in without_request_text(error, [short]).message


async def test_an_error_type_quoting_the_prompt_stays_out_of_the_message() -> None:
    prompt = "Please summarise the patient record of John Smith"
    body = (
        b'{"type": "error", "error": {"type": "bad request for '
        + prompt.encode()
        + b'", "message": "invalid"}}'
    )
    failure = await _failure(_json_answer(400, body))
    assert failure.error_type is None and "John Smith" not in failure.message


def test_a_malformed_proxy_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from vapora.errors import ConfigError
    from vapora.providers.base import default_transport

    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:notaport")
    with pytest.raises(ConfigError, match="is not one httpx can use"):
        default_transport("https://api.openai.com")
