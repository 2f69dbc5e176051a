"""The provider client abstraction: one HTTP client per configured provider (the guide's LLMClient).

::

    client = make_client(name="claude", kind="anthropic", base_url=None, model="claude-...",
                         api_key=os.environ["ANTHROPIC_API_KEY"], timeout=30.0, price=price)
    done = await client.complete(ProviderRequest(prompt="Hello", max_tokens=256))
    async with client.stream(ProviderRequest(prompt="Hello")) as stream:
        async for text in stream:
            ...
    done = stream.completion        # text, finish_reason, usage, cost, timing

Usage is what the provider reported (``input_tokens`` includes cache reads and writes, as in
``events.contract.Usage``); a count the provider left out (an OpenAI stream that ended without
its usage chunk, Ollama's omitted counts, a missing output count) or reported as no count
(negative, past 2^53) is bounded (a token per UTF-8 byte: never under-counted), and
``Completion.usage_estimated`` says so. Every failure is a :class:`vapora.errors.ProviderError`
subclass; httpx exceptions are translated here, at the boundary. A failure after the first
streamed chunk is :class:`StreamBroken` (a ``ProviderStreamBroken``) carrying the text and the
usage known so far. No error, repr or log line contains the API key.

Requests always send an output limit: ``max_tokens`` or ``DEFAULT_MAX_TOKENS`` (4096, the
guide's Claude default), so that :meth:`ProviderClient.estimate_cost` is a true upper bound.
The values live in :mod:`vapora.providers.values`, the stream in :mod:`vapora.providers.stream`.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import re
import ssl
import time
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from decimal import Decimal
from types import TracebackType
from typing import Any, ClassVar, NoReturn

import anyio
import httpx
import msgspec

from events.contract import Price, Usage
from vapora.config import redact_url
from vapora.errors import (
    ConfigError,
    ProviderConfigError,
    ProviderContextOverflow,
    ProviderError,
    ProviderQuotaExhausted,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
    is_error_type,
)
from vapora.pricing import STANDARD_TIERS, cost, tier_price, upper_bound_cost
from vapora.providers.stream import CALLER_CANCELLED, FORWARD_FAILED, CompletionStream
from vapora.providers.transport import SENT_HOOK, KeepAliveTransport
from vapora.providers.values import (
    DEFAULT_MAX_TOKENS,
    Completion,
    ProviderRequest,
    StreamBroken,
    Turn,
    input_token_bound,
    may_reason,
    output_ceiling,
    sent_timeout,
    upper_bound_usage,
)
from vapora.providers.wire import (
    MAX_FRAME_BYTES,
    Frame,
    FrameTooLong,
    NDJSONDecoder,
    SSEDecoder,
    retry_after_from_headers,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Completion",
    "CompletionStream",
    "ProviderClient",
    "ProviderRequest",
    "StreamBroken",
    "quotes_request",
    "without_request_text",
]

_log = logging.getLogger("vapora.providers")
_JSON = {"content-type": "application/json"}
_EWMA_ALPHA = 0.2
_MAX_MESSAGE = 500


class _Ewma:
    __slots__ = ("count", "value")

    def __init__(self) -> None:
        self.value: float | None = None
        self.count = 0

    def observe(self, sample: float) -> None:
        self.count += 1
        self.value = (
            sample if self.value is None else self.value + _EWMA_ALPHA * (sample - self.value)
        )


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """One default TLS context for every client: building one takes tens of milliseconds."""
    return httpx.create_ssl_context()


def default_transport(base_url: str, max_connections: int = 100) -> httpx.AsyncBaseTransport:
    """The transport of a client (the provider actor's too): :class:`KeepAliveTransport`, or
    httpx's own through the proxy the environment configures for ``base_url``
    (``HTTPS_PROXY``, ``HTTP_PROXY``, ``ALL_PROXY``, minus ``NO_PROXY``), which
    :class:`KeepAliveTransport` does not speak."""
    proxy = proxy_for(base_url)
    if proxy is None:
        return KeepAliveTransport(max_connections=max_connections)
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    try:
        return httpx.AsyncHTTPTransport(
            proxy=proxy, limits=limits, retries=0, verify=_tls_context()
        )
    except ImportError as exc:  # a SOCKS proxy without httpx's socks extra
        raise ConfigError(
            f"the proxy {redact_url(proxy)} configured for {redact_url(base_url)} needs "
            "httpx's SOCKS support: pip install 'httpx[socks]'"
        ) from exc
    except (ValueError, httpx.InvalidURL) as exc:  # a scheme httpx does not know, a bad URL
        raise ConfigError(
            f"the proxy {redact_url(proxy)} the environment configures for "
            f"{redact_url(base_url)} is not one httpx can use ({exc})"
        ) from exc


def proxy_for(url: str) -> str | None:
    """The proxy the environment configures for ``url``, or None (none, ``NO_PROXY``, or a
    loopback host: a local Ollama, or a simulator, is never reached through a proxy). A value
    without a scheme is an ``http://`` proxy, as httpx and curl read it."""
    proxies = urllib.request.getproxies()
    parsed = httpx.URL(url)
    if not proxies or _loopback(parsed.host) or urllib.request.proxy_bypass(parsed.host):
        return None
    proxy = proxies.get(parsed.scheme) or proxies.get("all")
    if proxy and "://" not in proxy:
        proxy = f"http://{proxy}"
    return proxy or None


def _loopback(host: str) -> bool:
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProviderClient(ABC):
    """One configured provider: its HTTP pool, wire format, price and observed latency.

    Subclasses implement the wire format (:meth:`_path`, :meth:`_body`, :meth:`_parse`,
    :meth:`_on_frame`, :meth:`_error_fields`); this class does HTTP, timing, errors and cost.
    """

    kind: ClassVar[str]
    default_base_url: ClassVar[str]
    paid: ClassVar[bool] = True
    framing: ClassVar[str] = "sse"

    def __init__(
        self,
        *,
        name: str,
        model: str,
        api_key: str | None,
        price: Price,
        base_url: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.model = model
        self.price = price
        self.timeout = float(timeout)
        self.base_url = (base_url or self.default_base_url).rstrip("/")
        key = (api_key or "").strip()  # a trailing newline from a key file: not the key's
        if not all("!" <= char <= "~" for char in key):
            raise ValueError(
                f"{name}: the API key holds a space, a control or a non-ASCII character "
                "(not shown); no header can carry it as it is"
            )
        self._api_key = key or None
        self._clock = clock
        self._latency = _Ewma()
        self._ttft = _Ewma()
        # Calls go to the transport directly (see _send); the client is kept for what it adds
        # elsewhere (the health check's GET) and closes the transport with it.
        self._transport = transport or default_transport(self.base_url, max_connections)
        self._http = httpx.AsyncClient(
            base_url=self.base_url,
            transport=self._transport,
            timeout=httpx.Timeout(self.timeout, connect=min(self.timeout, 10.0)),
            headers=self._headers(self._api_key),
        )
        # What httpx's build_request would work out on every call, worked out once: the
        # headers (the client's and ours), the timeouts, an absolute URL per path.
        self._post_headers = httpx.Headers(self._http.headers)
        self._post_headers.update(_JSON)
        self._extensions = {"timeout": self._http.timeout.as_dict()}
        self._urls: dict[str, httpx.URL] = {}

    def __repr__(self) -> str:
        key = "set" if self._api_key else "unset"
        return (
            f"<{type(self).__name__} name={self.name!r} model={self.model!r} "
            f"base_url={redact_url(self.base_url)!r} api_key={key}>"
        )

    async def __aenter__(self) -> ProviderClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    # --- the public surface -----------------------------------------------------------------

    async def complete(
        self, request: ProviderRequest, *, time_limit: float | None = None
    ) -> Completion:
        """One non-streaming call; raises a ``ProviderError`` subclass on failure.

        ``time_limit`` (seconds) overrides the client's ``timeout`` for this call.
        """
        self._require_key()
        model = request.model or self.model
        started = time.perf_counter()
        past = output_ceiling(model, 0)
        turn = Turn(unseen_output=may_reason(model), past_limit=past)
        path, body = self._path(request, model, stream=False), self._body(request, model, False)
        try:
            response = await self._post(path, body, time_limit, turn)
        except ProviderError as error:
            if turn.answered:
                raise self._unread(error, request) from error
            if turn.sent and not turn.refused and sent_timeout(error):
                raise self._unanswered(error, request) from error
            raise
        try:
            self._read_body(response.content, turn)
        except ProviderError as error:
            if turn.input_tokens is not None or turn.output_tokens is not None:
                raise self._misread(error, turn, request) from error
            raise
        latency = (time.perf_counter() - started) * 1000
        self._latency.observe(latency)
        return self._completion(turn, request, model, latency, None, 0)

    def stream(
        self,
        request: ProviderRequest,
        *,
        time_limit: float | None = None,
        first_token_limit: float | None = None,
    ) -> CompletionStream:
        """A streaming call: iterate the returned :class:`CompletionStream` for text chunks.

        ``time_limit`` bounds the whole stream, ``first_token_limit`` the first chunk (seconds).
        """
        self._require_key()
        return CompletionStream(self, request, time_limit or self.timeout, first_token_limit)

    def estimate_cost(self, request: ProviderRequest) -> Decimal:
        """An upper bound of the call's cost, for budget reservations: the router's
        (:func:`vapora.pricing.upper_bound_cost` of :func:`input_token_bound`)."""
        model = request.model or self.model
        output = output_ceiling(model, request.output_limit)
        return upper_bound_cost(input_token_bound(request), output, self.price)

    def latency_estimate(self) -> float | None:
        """The observed latency of successful calls in ms (an EWMA), or None before any."""
        return self._latency.value

    def first_token_estimate(self) -> float | None:
        """The observed time to first streamed chunk in ms (an EWMA), or None before any."""
        return self._ttft.value

    async def available(self) -> bool:
        """Whether the provider can be called: for paid providers, an API key is configured."""
        return self._api_key is not None

    # --- the wire format (subclasses) -------------------------------------------------------

    @classmethod
    @abstractmethod
    def _headers(cls, api_key: str | None) -> dict[str, str]:
        """Headers sent with every request (authentication, API version)."""

    @abstractmethod
    def _path(self, request: ProviderRequest, model: str, *, stream: bool) -> str:
        """The request path under the base URL."""

    @abstractmethod
    def _body(self, request: ProviderRequest, model: str, stream: bool) -> dict[str, Any]:
        """The JSON request body."""

    @abstractmethod
    def _parse(self, data: Any, turn: Turn) -> None:
        """Fill ``turn`` from a non-streaming response body."""

    @abstractmethod
    def _parse_usage(self, data: Any, turn: Turn) -> None:
        """Fill ``turn``'s counts alone from a non-streaming body that :meth:`_parse` could not
        read as an answer (what a body of the provider's shape says it billed)."""

    @abstractmethod
    def _on_frame(self, frame: Frame, turn: Turn) -> str | None:
        """Apply one stream frame to ``turn``; return its text, if any; raise on error events."""

    @abstractmethod
    def _error_fields(self, payload: Any) -> tuple[str | None, str]:
        """``(error type, message)`` of an error body."""

    def _error_class(
        self, status: int, error_type: str | None, payload: Any
    ) -> type[ProviderError] | None:
        """A provider-specific classification that overrides the status rules, or None."""
        return None

    def _context_overflow(self, error_type: str | None, payload: Any, message: str) -> bool:
        """Whether a caller error says the input is longer than the model's context window (the
        providers' own wordings, :data:`_OVERFLOW_PHRASES`)."""
        text = message.lower()
        return any(phrase in text for phrase in _OVERFLOW_PHRASES)

    def _error_status(self, payload: dict[str, Any]) -> int:
        """The HTTP status an error body answered with 200 (or inside a stream) stands for."""
        return 500

    def _retry_hint(self, payload: Any) -> float | None:
        """A wait (seconds) the error body asks for, where the provider puts it in the body."""
        return None

    # --- HTTP and errors --------------------------------------------------------------------

    def _require_key(self) -> None:
        if self.paid and self._api_key is None:
            raise ProviderConfigError(
                f"{self.name}: no API key configured",
                provider=self.name,
                error_type="missing_api_key",
            )

    def _request(self, path: str, body: dict[str, Any], turn: Turn | None = None) -> httpx.Request:
        """A POST of ``body`` as JSON to ``path``, built without httpx's per-call merging.

        Sent by :meth:`_send`: the client's headers and timeouts apply as with ``post``;
        cookies a provider sets are not sent back (an API key authenticates). ``turn`` is told
        when the request goes out (:attr:`Turn.sent`): by vapora's transport as it writes it;
        by httpx's own (the one a proxy needs) through its ``trace`` extension, as the
        request's headers start going out (not the proxy's ``CONNECT``: a call stuck there
        never reached the provider); with any other, at once (it may have gone out).
        """
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        extensions: dict[str, Any] = self._extensions
        if turn is not None:
            if isinstance(self._transport, KeepAliveTransport):
                extensions = {**extensions, SENT_HOOK: turn.mark_sent}
            elif isinstance(self._transport, httpx.AsyncHTTPTransport):
                extensions = {**extensions, "trace": turn.trace_sent}
            else:  # a transport that does not say: it may have gone out
                turn.sent = True
        return httpx.Request(
            "POST",
            url,
            headers=self._post_headers,
            content=msgspec.json.encode(body),
            extensions=extensions,
        )

    async def _send(
        self, request: httpx.Request, *, stream: bool = False, turn: Turn | None = None
    ) -> httpx.Response:
        """``request`` through the transport itself: what ``AsyncClient.send`` does for a call
        that needs no auth flow, redirects or cookies, without its layers (about a fifth of the
        provider actor's CPU). The transport's exceptions are httpx's, as through the client;
        without ``stream`` the body is read, and the connection released, before returning."""
        response = await self._transport.handle_async_request(request)
        response.request = request
        if not stream:
            if turn is not None:
                # 2xx: answered (billed, whatever comes next); else refused (nothing billed,
                # though its body may stall past the time limit).
                turn.answered = 200 <= response.status_code < 300
                turn.refused = not turn.answered
            try:
                await response.aread()
            except httpx.HTTPError:
                if 200 <= response.status_code < 300:
                    raise
                # An error answer whose body was cut or undecodable: its status still says
                # what happened (a caller error must not fall back, a 429 keeps its wait).
                return httpx.Response(
                    response.status_code, headers=response.headers, content=b"", request=request
                )
            finally:
                await response.aclose()
        return response

    async def _post(
        self, path: str, body: dict[str, Any], time_limit: float | None, turn: Turn | None = None
    ) -> httpx.Response:
        limit = time_limit or self.timeout
        sent = turn is None or turn.sent  # without a turn: not known, so it may have gone out
        try:
            # A cancel scope with a deadline, not ``fail_after`` (its generator costs ~4 µs more
            # per call): the deadline having cancelled the call is ``cancelled_caught``.
            with anyio.CancelScope(deadline=anyio.current_time() + limit) as scope:
                response = await self._send(self._request(path, body, turn), turn=turn)
        except TimeoutError as exc:
            raise self._timeout(limit, sent or turn.sent) from exc  # type: ignore[union-attr]
        except httpx.HTTPError as exc:
            raise self._fail(self._transport_error(exc)) from exc
        if scope.cancelled_caught:
            raise self._timeout(limit, sent or turn.sent)  # type: ignore[union-attr]
        if not 200 <= response.status_code < 300:  # a redirect too: no answer of the provider's
            raise self._fail(
                self._http_error(response.status_code, response.headers, response.content)
            )
        return response

    def _misread(self, error: ProviderError, turn: Turn, request: ProviderRequest) -> ProviderError:
        """``error``: a 2xx answer whose body could not be read as an answer, though it states
        the usage the provider billed (an empty ``choices``, a ``content`` of null). The same
        failure with that usage, a count it leaves out bounded from above (the output by the
        output limit: what the answer held is not known); the router falls back as for the
        failure itself (before 2026-11-27: recorded at $0)."""
        turn.unseen_output = True
        error.usage, error.usage_estimated = turn.usage(request)
        self._billed_at(error, turn, request)
        return error

    def _unread(self, error: ProviderError, request: ProviderRequest) -> ProviderError:
        """``error`` (a cut, a time limit) came while the body of a 2xx answer was read: the
        provider made the whole answer and bills it, and what it billed is in the body it did
        not give. The same failure, at the attempt's upper bound (its whole input bound and
        output limit), so that the spend is recorded and the budget keeps it; the router falls
        back as for the failure itself."""
        kind = type(error) if isinstance(error, ProviderTimeout) else ProviderUnavailable
        bounded = kind(
            f"{error.message}, reading the body of its answer (HTTP 2xx): billed by the "
            "provider, recorded at the attempt's upper bound",
            provider=self.name,
            error_type="answer_cut" if kind is ProviderUnavailable else error.error_type,
            usage=upper_bound_usage(request, request.model or self.model),
        )
        bounded.usage_estimated = True
        return self._fail(bounded)

    def _timeout(self, limit: float, sent: bool = True) -> ProviderError:
        """The time limit ran out: after the request went out (``timeout``: the provider may
        answer it and bill it), or before (``connect_timeout``: nothing sent, nothing billed)."""
        if not sent:
            return self._fail(
                ProviderTimeout(
                    f"{self.name}: could not send the request within {limit:g}s",
                    provider=self.name,
                    error_type="connect_timeout",
                )
            )
        return self._fail(
            ProviderTimeout(
                f"{self.name}: no answer within {limit:g}s",
                provider=self.name,
                error_type="timeout",
            )
        )

    def _unanswered(self, error: ProviderError, request: ProviderRequest) -> ProviderError:
        """``error``, a time limit that ran out after the request went out and before the
        provider answered: the provider goes on with the request, and bills it, whether or not
        anyone waits for the answer, and what it bills is not known. The same failure at the
        attempt's upper bound (its whole input bound and output limit), so that the spend is
        recorded and the budget keeps it (before 2026-11-27: recorded at $0, and the attempt's
        hold expired); the router falls back as for any time-out."""
        bounded = ProviderTimeout(
            f"{error.message}; the provider had the request and may still answer and bill "
            "it: recorded at the attempt's upper bound",
            provider=self.name,
            error_type=error.error_type,
            usage=upper_bound_usage(request, request.model or self.model),
        )
        bounded.usage_estimated = True
        return self._fail(bounded)

    def _decode(self, content: bytes) -> Any:
        try:
            return msgspec.json.decode(content)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise self._fail(self._malformed()) from exc

    def _malformed(self) -> ProviderError:
        return ProviderUnavailable(
            f"{self.name}: malformed response body",
            provider=self.name,
            error_type="malformed_response",
        )

    def _transport_error(self, exc: httpx.HTTPError) -> ProviderError:
        detail = self._scrub(f"{type(exc).__name__}: {exc}")[:_MAX_MESSAGE]
        if isinstance(exc, httpx.TimeoutException):
            # Connecting (or waiting for a pooled connection) timed out: nothing was sent, so
            # nothing can be billed; any other timeout came after the request went out.
            unsent = isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout)
            return ProviderTimeout(
                f"{self.name}: {detail}",
                provider=self.name,
                error_type="connect_timeout" if unsent else "timeout",
            )
        return ProviderUnavailable(
            f"{self.name}: {detail}", provider=self.name, error_type="connection"
        )

    def _http_error(self, status: int, headers: Mapping[str, str], content: bytes) -> ProviderError:
        """Classify an HTTP error answer (DESIGN §3 error classes, providers.md §3.5)."""
        try:
            payload: Any = msgspec.json.decode(content)
        except (msgspec.DecodeError, RecursionError):
            payload = None
        error_type, message = self._error_fields(payload)
        if error_type is not None and (
            not is_error_type(error_type)
            or self._scrub(error_type) != error_type
            or error_type in _VAPORAS_OWN
        ):
            # Not an identifier (it may quote the request), or it holds the key: no type, and
            # not in the message either; nor one of vapora's own (a provider's "caller
            # cancelled" would pass for the caller's cancel).
            error_type = None
        if payload is None:  # the body as text, scrubbed before it is cut (a key cut in two
            # halves would no longer match); a bound well past the cut, so nothing of a key at
            # the bound survives the cut either
            message = content[: _MAX_MESSAGE * 64].decode("utf-8", "replace")
        text = self._scrub(f"{self.name}: HTTP {status} {error_type or 'error'}: {message}")[
            :_MAX_MESSAGE
        ]
        kind = self._error_class(status, error_type, payload) or _status_class(status)
        if kind is ProviderRejected and self._context_overflow(error_type, payload, message):
            kind = ProviderContextOverflow
        if kind is ProviderRateLimited:
            wait = retry_after_from_headers(headers, datetime.now(UTC))
            wait = wait if wait is not None else self._retry_hint(payload)
            return ProviderRateLimited(
                text,
                retry_after=wait,
                provider=self.name,
                http_status=status,
                error_type=error_type,
            )
        return kind(text, provider=self.name, http_status=status, error_type=error_type)

    def _scrub(self, text: str) -> str:
        """``text`` without the API key: as given, trimmed (a server trims a header's value
        before quoting it back) and escaped (as an exception's repr of the header shows it)."""
        key = self._api_key
        if not key:
            return text
        for form in (key, key.strip(), repr(key)[1:-1], repr(key.encode())[2:-1]):
            if form and form in text:
                text = text.replace(form, "[redacted]")
        return text

    def _fail(self, error: ProviderError) -> ProviderError:
        # Its class, status and type: its message may still quote the request's text (the
        # provider actor takes that out before the error goes anywhere).
        _log.debug(
            "provider call failed: %s (%s, HTTP %s, %s)",
            type(error).__name__,
            self.name,
            error.http_status,
            error.error_type,
        )
        return error

    # --- results ----------------------------------------------------------------------------

    def _completion(
        self,
        turn: Turn,
        request: ProviderRequest,
        model: str,
        latency: float,
        first_token: float | None,
        chunks: int,
    ) -> Completion:
        usage, estimated = turn.usage(request)
        price = self._turn_price(turn, request, model)
        return Completion(
            provider=self.name,
            model=stated_model(turn.model, model),
            text=turn.text,
            # An identifier only: it goes to the call's event, the caller, spans and metrics (a
            # provider's object there made the event unreadable; its prompt there was stored).
            finish_reason=turn.finish_reason if is_error_type(turn.finish_reason) else None,
            usage=usage,
            cost_usd=cost(usage, price),
            price=price,
            latency_ms=latency,
            first_token_ms=first_token,
            response_id=turn.response_id,
            chunks=chunks,
            usage_estimated=estimated,
            reasoning_tokens=_reasoning(turn, usage, estimated),
        )

    def _turn_price(self, turn: Turn, request: ProviderRequest, model: str) -> Price:
        """The price the call of ``turn`` is billed at: the request's (or this client's), or
        that of the service tier the provider said it served the call at."""
        price = request.price or self.price
        if turn.service_tier is not None and turn.service_tier not in STANDARD_TIERS:
            price = self._tier_price(price, model, turn.service_tier)
        return price

    def _billed_at(self, error: ProviderError, turn: Turn, request: ProviderRequest) -> None:
        """A failure billed what ``turn`` received: at the service tier the provider said."""
        if turn.service_tier is not None and turn.service_tier not in STANDARD_TIERS:
            error.price = self._turn_price(turn, request, request.model or self.model)

    def _tier_price(self, price: Price, model: str, tier: str) -> Price:
        """The price of a call served at service tier ``tier`` (see :func:`tier_price`); the
        standard ``price``, said once per provider and tier in the log, when vapora has no
        rates of that tier (the spend is then recorded at the standard rates: before
        2026-11-27 always, a priority call at half what OpenAI bills)."""
        priced = tier_price(self.kind, model, price, tier, datetime.now(UTC))
        if priced is not None:
            return priced
        if (self.name, tier) not in _UNPRICED_TIERS and len(_UNPRICED_TIERS) < 64:
            _UNPRICED_TIERS.add((self.name, tier))
            _log.warning(
                "%s answered at service tier %r, which vapora has no price of its own for "
                "(model %s, price from %s): recorded at the standard rates",
                self.name,
                tier,
                model,
                price.source,
            )
        return price

    def _read_frames(self, frames: list[Frame], turn: Turn) -> None:
        """Stream frames applied to ``turn`` in order, their text appended to its parts; a
        frame of an unexpected shape is malformed (the text of the frames before it is kept)."""
        on_frame, append = self._on_frame, turn.parts.append
        try:
            for frame in frames:
                text = on_frame(frame, turn)
                if text:
                    append(text)
        except _SHAPE_ERRORS as exc:
            raise self._malformed() from exc

    def _feed(
        self, decoder: SSEDecoder | NDJSONDecoder, data: bytes, turn: Turn | None = None
    ) -> list[Frame]:
        try:
            return decoder.feed(data)
        except FrameTooLong as exc:
            if turn is not None:  # an event that long is output the answer holds, unread
                turn.unseen_output = True
            raise self._malformed() from exc

    async def _labelled_no_stream(
        self, response: httpx.Response, kind: str, turn: Turn
    ) -> AsyncIterator[bytes]:
        """The body of a stream answered HTTP 2xx with a JSON or HTML content type: its bytes as
        a stream when it begins as one (a server's default label for SSE: read as it comes,
        not whole), else read whole (:meth:`_not_a_stream`)."""
        chunks = response.aiter_bytes()
        html = kind.lstrip().lower().startswith("text/html")
        if not html and (self.framing == "ndjson" or not _json_like(kind)):
            return chunks  # NDJSON: its lines are JSON, and an error line is read as one
        # Read until the body's start says what it is: SSE begins with a field (``data:``
        # ...) or a comment (``:``); anything else is read whole. Blank bytes and a BOM before
        # it are dropped as they come (they mean nothing to SSE or JSON; a first read may hold
        # a newline alone, "da" of "data:", or the first byte of a BOM), so what is kept
        # while undecided is a few bytes, however many blanks come first.
        head = b""
        stream: bool | None = None
        while stream is None:
            read = await self._next_read(chunks, kind, turn)
            if read is None:
                break
            head = (head + read).lstrip(_BLANKS)
            if head.startswith(_BOM):
                head = head[len(_BOM) :].lstrip(_BLANKS)
            if head and not _BOM.startswith(head):  # (else a BOM's first bytes, or nothing)
                stream = _sse_start(head)
        if stream and not html:
            return _chained(head, chunks)
        if head.startswith(b"[") and not html:
            # A stream's events as a JSON array (Gemini's form without ``alt=sse``, when a
            # proxy drops it): read as they come, each as an SSE event (one past the frame
            # limit is malformed, as an SSE event is); one with no object in it is no answer.
            return await self._array_events(head, chunks, kind, turn)
        await self._not_a_stream(head, chunks, kind, turn)

    async def _not_a_stream(
        self, first: bytes, rest: AsyncIterator[bytes], kind: str, turn: Turn
    ) -> NoReturn:
        """A stream answered HTTP 2xx with a body that is no stream, read whole (up to
        :data:`_MAX_WHOLE` bytes). A JSON object: its error if it carries one (classified as
        the same body with its status would be, nothing billed), else malformed, billed only
        the usage it states (a server that ignored ``stream`` and answered whole). Anything else
        (an HTML page ...): malformed, naming the content type, nothing billed. Before
        2026-11-27 such bodies were read as an empty stream, "ended before its final event",
        billed the input bound, the body's own error lost. A body cut (or timed out) while
        read, or a JSON object past the size limit or cut short of its end, was an answer:
        raised as cut, billed as a cut answer is."""
        parts, size = [first], len(first)
        while (read := await self._next_read(rest, kind, turn)) is not None:
            parts.append(read)
            size += len(read)
            if size > _MAX_WHOLE:
                raise self._cut(kind, turn, ValueError(f"past {_MAX_WHOLE} bytes"))
        content = b"".join(parts)
        try:
            data: Any = msgspec.json.decode(content)
        except (msgspec.DecodeError, RecursionError):
            if first.startswith(b"{"):  # an object cut short (a body ended by its close)
                raise self._cut(kind, turn, ValueError("no whole JSON object")) from None
            data = None
        if isinstance(data, dict) and data.get("error"):
            raise self._http_error(self._error_status(data), {}, content)
        if isinstance(data, dict):
            self._stated_usage(data, turn)
        if turn.input_tokens is not None or turn.output_tokens is not None:
            turn.answered = turn.unseen_output = True  # the provider's answer: billed
        raise ProviderUnavailable(
            f"{self.name}: a stream was answered with {kind.split(';')[0].strip()}, not a stream",
            provider=self.name,
            error_type="malformed_response",
        )

    async def _array_events(
        self, first: bytes, rest: AsyncIterator[bytes], kind: str, turn: Turn
    ) -> AsyncIterator[bytes]:
        """A JSON array of a stream's events, as it comes, as SSE: each object item, once
        whole, as ``data: <item>``; an item that is no object is passed by; one past
        :data:`MAX_FRAME_BYTES` is raised as too long (as such an SSE event is). An array cut
        short gives the events read before the cut (a stream cut there); one that ends with no
        object in it (``[]``) is malformed, nothing billed."""
        scanner = _ArrayItems()
        try:
            events = scanner.feed(first)
            while not events:
                # Ended with no event (nothing more is awaited after its ``]``): no answer.
                read = None if scanner.closed else await self._next_read(rest, kind, turn)
                if read is None:
                    raise ProviderUnavailable(
                        f"{self.name}: a stream was answered with an empty JSON array",
                        provider=self.name,
                        error_type="malformed_response",
                    )
                events = scanner.feed(read)
        except FrameTooLong as exc:
            turn.answered = turn.unseen_output = True  # a 2xx with an event: an answer
            raise self._malformed() from exc
        return self._array_rest(scanner, events, rest, turn)

    async def _array_rest(
        self, scanner: _ArrayItems, events: bytes, rest: AsyncIterator[bytes], turn: Turn
    ) -> AsyncIterator[bytes]:
        yield events
        while not scanner.closed:  # once the array ended, nothing after it is awaited
            try:
                read = await rest.__anext__()
            except StopAsyncIteration:
                return
            try:
                more = scanner.feed(read)
            except FrameTooLong as exc:
                turn.unseen_output = True  # an event that long is output, unread
                raise self._malformed() from exc
            if more:
                yield more

    async def _next_read(self, chunks: AsyncIterator[bytes], kind: str, turn: Turn) -> bytes | None:
        """The next read of a 2xx body read here before it is streamed (None at its end): a
        cut, or a time-out, while it is awaited is a cut answer (billed as one)."""
        try:
            return await chunks.__anext__()
        except StopAsyncIteration:
            return None
        except httpx.HTTPError as exc:
            raise self._cut(kind, turn, exc) from exc
        except anyio.get_cancelled_exc_class():
            turn.answered = turn.unseen_output = True  # a 2xx, its time out while read
            raise

    def _stated_usage(self, data: Any, turn: Turn) -> None:
        """``turn``'s counts from what a whole body states (unreadable counts: none); a whole
        body's counts are its last."""
        try:
            self._parse_usage(data, turn)
        except _SHAPE_ERRORS:
            turn.input_tokens = turn.output_tokens = None
        turn.running_output = False

    def _cut(self, kind: str, turn: Turn, exc: BaseException) -> ProviderError:
        turn.answered = turn.unseen_output = True  # a 2xx: the provider made an answer
        return ProviderUnavailable(
            f"{self.name}: the answer ({kind.split(';')[0].strip()}) was cut while read "
            f"({type(exc).__name__})",
            provider=self.name,
            error_type="answer_cut",
        )

    def _read_body(self, content: bytes, turn: Turn) -> None:
        """A non-streaming body applied to ``turn``; a body of an unexpected shape is malformed
        (each ``_parse`` requires the field its answer lives in), and an error body with status
        200 is the error it carries (both transient: the router falls back, nothing is billed
        for an answer that is not one)."""
        data = self._decode(content)
        if isinstance(data, dict) and data.get("error"):
            raise self._fail(self._http_error(self._error_status(data), {}, content))
        try:
            self._parse(data, turn)
        except _SHAPE_ERRORS as exc:
            # Its usage, if it states one: a body of the provider's shape, billed as it says.
            self._stated_usage(data, turn)
            raise self._fail(self._malformed()) from exc
        except ProviderError as error:  # an error body with status 200 (Ollama)
            raise self._fail(error) from error.__cause__
        turn.running_output = False  # a whole body's (Gemini's without a finish: still its last)

    async def _stream_reads(
        self, request: ProviderRequest, model: str, turn: Turn
    ) -> AsyncGenerator[None, None]:
        """A streaming call, filling ``turn``; yields each time a network read added text.

        One read usually completes several frames: all are parsed before yielding, so the
        consumer (:class:`CompletionStream`) wakes once per read, not once per frame. Time
        limits are applied by the consumer, around the whole stream, so no timer per read.
        """
        post = self._request(
            self._path(request, model, stream=True), self._body(request, model, True), turn
        )
        decoder = NDJSONDecoder() if self.framing == "ndjson" else SSEDecoder()
        parts = turn.parts
        try:
            response = await self._send(post, stream=True)
            async with aclosing(response):
                if not 200 <= response.status_code < 300:
                    turn.refused = True  # nothing billed, though its body may stall
                    try:
                        content = await response.aread()
                    except httpx.HTTPError:  # cut or undecodable: the status still classifies
                        content = b""
                    raise self._http_error(response.status_code, response.headers, content)
                kind = response.headers.get("content-type", "")
                chunks: AsyncIterator[bytes]
                if _NOT_A_STREAM.match(kind):
                    # Its error, or a whole answer, raised; a stream labelled so (a
                    # framework's default) read as one.
                    chunks = await self._labelled_no_stream(response, kind, turn)
                else:
                    chunks = response.aiter_bytes()
                turn.answered = True
                ended = True
                async for data in chunks:
                    count = len(parts)
                    self._read_frames(self._feed(decoder, data, turn), turn)
                    if len(parts) > count:
                        yield
                    if turn.done:
                        # The answer's final event: what follows (normally the body's end, a
                        # usage frame at most) gets a short grace, not the call's whole time
                        # limit: a server that never ends the body has still answered.
                        ended = False
                        with anyio.move_on_after(_DONE_GRACE_S):
                            try:
                                async for data in chunks:
                                    self._read_frames(self._feed(decoder, data, turn), turn)
                            except httpx.HTTPError:
                                # Cut after it: the answer is whole, and a frame begun after
                                # it and cut is left unread (not a malformed answer).
                                break
                            ended = True
                        break
                if ended:
                    count = len(parts)
                    self._read_frames(decoder.flush(), turn)
                    if len(parts) > count:
                        yield
        except httpx.HTTPError as exc:
            raise self._transport_error(exc) from exc
        if not turn.done:
            raise ProviderUnavailable(
                f"{self.name}: stream ended before its final event",
                provider=self.name,
                error_type="incomplete_stream",
            )


_BY_STATUS: dict[int, type[ProviderError]] = {
    401: ProviderConfigError,
    402: ProviderQuotaExhausted,
    403: ProviderConfigError,
    404: ProviderConfigError,
    408: ProviderUnavailable,
    409: ProviderUnavailable,
    429: ProviderRateLimited,
    504: ProviderTimeout,
}


#: How each provider says an input does not fit its model's context window (lower case):
#: Anthropic "prompt is too long: N tokens > M maximum" and "input length and `max_tokens`
#: exceed context limit: ...", OpenAI "This model's maximum context length is N tokens ..."
#: (code ``context_length_exceeded``), Gemini "The input token count (N) exceeds the maximum
#: number of tokens allowed (M).", Ollama "the input length exceeds the context length".
_OVERFLOW_PHRASES = (
    "prompt is too long",
    "exceed context limit",
    "maximum context length",
    "context_length_exceeded",
    "exceeds the maximum number of tokens allowed",
    "exceeds the context length",
)

#: How long a stream's body may go on after the answer's final event before it is closed.
_DONE_GRACE_S = 2.0

# RecursionError: msgspec's answer to JSON nested deeper than it decodes (a few KB of brackets).
_SHAPE_ERRORS = (AttributeError, KeyError, IndexError, TypeError, ValueError, RecursionError)
#: Error types vapora gives its own failures: never taken from a provider's error body.
_VAPORAS_OWN = frozenset({CALLER_CANCELLED, FORWARD_FAILED})


async def _chained(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """``first``, then the rest of the reads."""
    yield first
    async for data in rest:
        yield data


class _ArrayItems:
    """Splits a JSON array's bytes into its top-level items as they come (strings and nesting
    followed; nothing else is checked: each item is decoded by the stream's reader)."""

    def __init__(self) -> None:
        self._item = bytearray()
        self._depth = 0  # 1 inside the array, more inside an item
        self._in_string = False
        self._escaped = False
        self.closed = False  # the array ended: what follows is none of it

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        item = self._item
        for byte in data:
            if self.closed:
                break
            if self._in_string:
                item.append(byte)
                if self._escaped:
                    self._escaped = False
                elif byte == 0x5C:  # backslash
                    self._escaped = True
                elif byte == 0x22:  # quote
                    self._in_string = False
            elif byte in b"[{":
                self._depth += 1
                if self._depth > 1:
                    item.append(byte)
            elif byte in b"]}":
                self._depth -= 1
                if self._depth >= 1:
                    item.append(byte)
                if self._depth <= 1:
                    out.append(self._take())
                self.closed = self._depth <= 0
            elif byte == 0x2C and self._depth == 1:  # a comma between items
                out.append(self._take())
            elif byte in b" \t\r\n":
                pass  # between tokens (a pretty-printed array's): an SSE event is one line
            elif self._depth >= 1:
                if byte == 0x22:
                    self._in_string = True
                item.append(byte)
            if len(item) > MAX_FRAME_BYTES:
                raise FrameTooLong(f"an array item longer than {MAX_FRAME_BYTES} bytes")
        return b"".join(event for event in out if event)

    def _take(self) -> bytes:
        item = bytes(self._item).strip()
        self._item.clear()
        return b"data: " + item + b"\n\n" if item.startswith(b"{") else b""


def _json_like(kind: str) -> bool:
    return "json" in kind.lower()


_BLANKS = b" \t\r\n"
#: The most of a stream's 2xx body read whole when it is no stream (a JSON object, a page).
_MAX_WHOLE = 16 << 20
_SSE_FIELDS = (b":", b"data:", b"event:", b"id:", b"retry:")


def _sse_start(start: bytes) -> bool | None:
    """Whether ``start`` (a body's first significant bytes) begins an SSE stream; None while
    too short to say ("da" of "data:")."""
    if start.startswith(_SSE_FIELDS):
        return True
    if any(field.startswith(start) for field in _SSE_FIELDS):
        return None
    return False


_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark


#: A content type no stream comes in (a 2xx stream answered so is read whole: its error, or
#: malformed).
_NOT_A_STREAM = re.compile(r"\s*(text/html|application/(\S*\+)?json)\b", re.IGNORECASE)


#: The shortest run of a request's text that counts as quoted in a provider's error message
#: (ordinary phrases of its own, "maximum context length", shorter), looked for every
#: :data:`_QUOTE_STEP` characters: a quoted run of 31 characters or more is always found; a
#: whole text shorter than the run counts when at least :data:`_QUOTE_SHORTEST` long.
_QUOTE_RUN = 24
_QUOTE_STEP = 8
_QUOTE_SHORTEST = 10
#: A text shorter than this is looked for whole: the windows find any run this long or longer.
_QUOTE_WHOLE = _QUOTE_RUN + _QUOTE_STEP - 1


#: An escape a provider (or a gateway before it) may quote the request's text with: JSON's and
#: Python's (``repr``) string escapes; a UTF-16 surrogate pair (JSON's escape of an emoji) first.
_ESCAPE = re.compile(
    r"\\u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
    r"|\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|x[0-9a-fA-F]{2}|.)",
    re.DOTALL,
)
_ESCAPED = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "0": "\0"}
_SPACES = re.compile(r"\s+")
_SPACED = re.compile(r"\s\s|[^\S ]")  # (a run, or whitespace other than a space)


def _unescaped(match: re.Match[str]) -> str:
    high, low, code = match[1], match[2], match[3]
    if high is not None:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + (int(low, 16) - 0xDC00))
    if len(code) > 1:
        try:
            return chr(int(code[1:], 16))
        except (ValueError, OverflowError):  # (past U+10FFFF)
            return match[0]
    return _ESCAPED.get(code, code)


#: A model name as providers write them (``gpt-4o-2024-08-06``, ``models/gemini-2.5-pro``,
#: ``llama3:8b``, ``anthropic.claude-3-5-sonnet-20240620-v1:0``).
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,199}")


def stated_model(stated: object, asked: str) -> str:
    """The model the provider says answered, when it looks like a model's name; else the one
    asked for. It goes into events, span attributes, metric labels and the text report: a
    server's ``"model"`` of 1.5 MB, or holding a newline or markup, was stored and shown whole
    (a review: report lines forged by a newline)."""
    if isinstance(stated, str) and _MODEL_NAME.fullmatch(stated):
        return stated
    if stated:
        _log.warning(
            "the provider named the answering model with something that is not a model's name "
            "(%d characters); recorded as the model asked for, %s",
            len(stated) if isinstance(stated, str) else 0,
            asked,
        )
    return asked


def quotes_request(text: str, sources: Sequence[str]) -> bool:
    """Whether ``text`` (a provider's error message) quotes one of ``sources`` (the request's
    prompt, system text and messages): a run of :data:`_QUOTE_RUN` characters of one (see
    there), or the whole of one shorter than that; as it is, or escaped (``\\n``, ``\\"``,
    ``\\u041f``: a JSON or ``repr`` quote of code, or of any non-Latin text, matched no run
    of it and went into the log whole, a review). Only the message's escapes are undone (the
    request's own backslashes stay as they are, as they are in its quote once undone)."""
    if _quotes(text, sources):
        return True
    said = _ESCAPE.sub(_unescaped, text) if "\\" in text else text
    if said is not text and _quotes(said, sources):
        return True
    # Its whitespace changed (runs collapsed, lines joined): both sides' runs made one space,
    # for a text whose whitespace that changes, and long enough to be looked for by runs (a
    # short one collapsed, "retry  after 20s", is the provider's own words as often).
    spaced = [_SPACES.sub(" ", x) for x in sources if _SPACED.search(x)]
    spaced = [x for x in spaced if len(x) >= _QUOTE_WHOLE]
    return bool(spaced) and _quotes(_SPACES.sub(" ", said), spaced)


def _quotes(text: str, sources: Sequence[str]) -> bool:
    for source in sources:
        if len(source) < _QUOTE_WHOLE:
            if len(source) >= _QUOTE_SHORTEST and source in text:
                return True
            continue
        for start in range(0, max(1, len(text) - _QUOTE_RUN + 1), _QUOTE_STEP):
            window = text[start : start + _QUOTE_RUN]
            if len(window) == _QUOTE_RUN and window in source:
                return True
    return False


def without_request_text(error: ProviderError, sources: Sequence[str]) -> ProviderError:
    """``error`` with its message dropped where it quotes the request's text, which
    must stay out of events, logs and spans unless the config opts in: a provider may echo the
    request into its error ("invalid value for messages[0].content: '...'"). What is kept says
    what happened: the provider, the HTTP status and the type."""
    # The provider's own words: vapora's prefix ("claude: HTTP 400 type: ") is not looked at,
    # nor the type (an identifier already, ProviderError).
    said = error.message.split(": ", 2)[-1]
    if quotes_request(said, sources):
        status = f"HTTP {error.http_status} " if error.http_status is not None else ""
        error.message = (
            f"{error.provider}: {status}{error.error_type or type(error).__name__}: the "
            "provider's message quoted the request's text (not kept)"
        )
        error.args = (error.message,)
    return error


def _status_class(status: int) -> type[ProviderError]:
    """The error class of an HTTP status without provider-specific detail (a redirect, or any
    other status below 400 that is no 2xx: the base URL is not the provider's API, nothing was
    billed)."""
    if status in _BY_STATUS:
        return _BY_STATUS[status]
    if status < 400:
        return ProviderConfigError
    return ProviderUnavailable if status >= 500 else ProviderRejected


#: (provider, service tier) pairs already said to have no price of their own.
_UNPRICED_TIERS: set[tuple[str, str]] = set()


def _reasoning(turn: Turn, usage: Usage, estimated: bool) -> int | None:
    """The reasoning count the provider reported, when it is one of the output counted:
    at most the output, whose count is the provider's too."""
    count = turn.reasoning_tokens
    if count is None or estimated or count > usage.output_tokens:
        return None
    return count
