"""What reaches a log line or a terminal from outside: a provider's error message (through the
router's fallback line, or `vapora ask`), a URL urllib3 quotes with its query. Control
characters are escaped (a newline wrote whole fake log lines, a review), a query's values are
masked (an OTLP endpoint's `?api_key=` was logged on each failed export, a review), and a URL's
password is masked whole, `?` and all."""

from __future__ import annotations

import io
import logging

import pytest

from vapora.config import redact_url
from vapora.telemetry.logs import FORMAT, TaskContextFilter, clean, printable


def _cleaned(message: str, *args: object) -> str:
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, message, args, None)
    clean(record)
    return record.getMessage()


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("boom\n2026-01-01 WARNING vapora: FAKE", "boom\\n2026-01-01 WARNING vapora: FAKE"),
        ("a\r\nNats-Service-Error-Code: 200", "a\\r\\nNats-Service-Error-Code: 200"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("line\u2028sep\x85nel\x00nul", "line\\u2028sep\\x85nel\\x00nul"),
        ("tab\tand Привет stay", "tab\tand Привет stay"),
    ],
)
def test_control_characters_are_escaped_and_text_stays(text: str, shown: str) -> None:
    assert printable(text) == shown
    assert _cleaned("fallback claude -> none (%s)", text) == f"fallback claude -> none ({shown})"


@pytest.mark.parametrize(
    ("message", "shown"),
    [
        (
            "Max retries exceeded with url: /v1/traces?api_key=CANARY (Caused by X('y'))",
            "Max retries exceeded with url: /v1/traces?api_key=*** (Caused by X('y'))",
        ),
        ("url: /v1/metrics?a=1&token=CANARY&b", "url: /v1/metrics?a=***&token=***&b"),
        ("url /x?flag&api_key=CANARY then", "url /x?flag&api_key=*** then"),
        ("https://h/v1/traces??api_key=CANARY x", "https://h/v1/traces??api_key=*** x"),
        ("is this a question? yes=no", "is this a question? yes=no"),
        ("route openai: manual override", "route openai: manual override"),
    ],
)
def test_a_urls_query_values_are_masked(message: str, shown: str) -> None:
    assert _cleaned(message) == shown


def test_the_handlers_filter_cleans_every_record_whatever_its_logger() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(TaskContextFilter())
    handler.setFormatter(logging.Formatter(FORMAT))
    logger = logging.getLogger("opentelemetry.exporter.otlp.proto.http.trace_exporter")
    logger.addHandler(handler)
    try:
        logger.warning("failed: %s", "/v1/traces?api_key=CANARY\nFAKE LINE")
    finally:
        logger.removeHandler(handler)
    [line] = out.getvalue().splitlines()
    assert "CANARY" not in line and line.endswith("?api_key=***\\nFAKE LINE")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://alice:pa?ss=SECRET@host:4222", "nats://alice:***@host:4222"),
        ("nats://u:p/w@d@host:1", "nats://u:***@host:1"),
        ("nats://token@host", "nats://***@host"),
        ("http://host/v1/traces?api_key=SECRET#f", "http://host/v1/traces?api_key=***#f"),
        ("nats://host:4222", "nats://host:4222"),
        # An `@` in a query: the token after it was shown (a review); now masked, with more
        # than it must (the host), never less.
        (
            "https://otel.example/v1/traces?to=ops@example.com&api_key=SECRET",
            "https://***@example.com&api_key=***",
        ),
        # Passwords holding `/`, `?`, `#` or `@` before a host of other characters (a review).
        ("nats://user:pa/ss@host :4222", "nats://user:***@host :4222"),
        ("nats://user:pa?ss@bücher.de:4222", "nats://user:***@bücher.de:4222"),
        ("nats://user:pa#ss@bücher.de:4222", "nats://user:***@bücher.de:4222"),
        ("https://user:s3c?ret=1@bücher.de/path", "https://user:***@bücher.de/path"),
        ("nats://user:ab@cd/ef@bücher.de:4222", "nats://user:***@bücher.de:4222"),
        ("nats://user:p?q@host/v1?k=v", "nats://user:***@host/v1?k=***"),
        ("https://user:p@ss@host/v1", "https://user:***@host/v1"),
        ("nats://u:p@[::1]:4222", "nats://u:***@[::1]:4222"),
        # Hosts the host-like `@` misses: the authority's last `@`, as before (a review: the
        # password was shown whole, in the very error that refuses such a URL).
        ("nats://user:s3cret@host :4222", "nats://user:***@host :4222"),
        ("nats://user:s3cret@bücher.de:4222", "nats://user:***@bücher.de:4222"),
    ],
)
def test_a_urls_password_is_masked_whole(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_bad_logging_call_is_not_raised_into_its_caller() -> None:
    """The filter formats the message to clean it: a call whose arguments do not fit its
    format raised there, out of the handler and into the actor's code (a review), where the
    logging module says "--- Logging error ---" and goes on."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(TaskContextFilter())
    logger = logging.getLogger("vapora.test.bad-call")
    logger.addHandler(handler)
    logger.propagate = False  # (pytest's own handler raises what a handler meets)
    try:
        logger.warning("%d items", "x")  # (the logging module prints its own error)
        logger.warning("after: %s", "fine")
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    assert out.getvalue().splitlines()[-1] == "after: fine"
