"""A provider's error message that quotes the request's text is not kept (prompts stay out of
events, logs and spans unless the config opts in): as it is, escaped as JSON or ``repr`` does
(code, non-Latin text, an emoji's surrogate pair, a prompt's own backslashes), or with its
whitespace collapsed; a message of the provider's own words is kept."""

from __future__ import annotations

import json

import pytest

from vapora.providers.base import quotes_request

_CODE = 'def check(pw):\n    if pw == "hunter2":\n        return True\n    return False\n'
_RUSSIAN = "Сведи квартальные цифры по счёту Занзибар 😀 за прошлый год"
_LATEX = r"Solve \frac{a}{b} + \sqrt{x^2} = \alpha for x and show every step"
_SPACED = "My SSN is  123-45-6789   and card 4111 1111 1111 1111, please help"


@pytest.mark.parametrize("prompt", [_CODE, _RUSSIAN, _LATEX, _SPACED])
@pytest.mark.parametrize(
    "quote",
    [
        lambda p: p,
        json.dumps,
        repr,
        lambda p: " ".join(p.split()),  # whitespace collapsed
        lambda p: json.dumps(p, ensure_ascii=False),
    ],
    ids=["as-is", "json", "repr", "collapsed", "json-unicode"],
)
def test_a_quote_of_the_prompt_is_found_however_it_is_written(prompt: str, quote: object) -> None:
    message = f"messages.0.content: invalid value: {quote(prompt)}"  # type: ignore[operator]
    assert quotes_request(message, [prompt])


@pytest.mark.parametrize(
    "message",
    [
        "maximum context length is 8192 tokens, however you requested 9000",
        "rate limit exceeded, retry after 20s",
        r"odd escapes \q \x \u12 \U0011FFFF \ud800 alone",
        "model not found: gpt-4o; max_tokens must be at most 4096",
    ],
)
def test_the_providers_own_words_are_kept(message: str) -> None:
    # (short texts whose whitespace differs match nothing but themselves: a review found the
    # provider's own words taken for their quote once collapsed)
    shorts = ["Rate limit exceeded", "retry    after 20s", "model  not found", "must be\tat most"]
    assert not quotes_request(message, [_CODE, _RUSSIAN, *shorts])
