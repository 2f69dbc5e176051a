"""Argument types the ``vapora`` commands share (each refuses a bad value with a message that
argparse prints naming the flag)."""

from __future__ import annotations

import argparse

__all__ = ["given", "port", "whole_number"]


def given(text: str) -> str:
    """A flag's value that must say something: an empty one was taken as not given (``--data-dir
    ""`` ran on ``./.vapora``, ``--config ""`` on the built-in config, ``health --service ""``
    pinged every service)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def whole_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None


def port(text: str) -> int:
    """A TCP port to serve on (0: any free one)."""
    value = whole_number(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {value}")
    return value
