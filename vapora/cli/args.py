"""Argument types the ``vapora`` commands share (each refuses a bad value with a message that
argparse prints naming the flag)."""

from __future__ import annotations

import argparse

__all__ = ["given"]


def given(text: str) -> str:
    """A flag's value that must say something: an empty one was taken as not given (``--data-dir
    ""`` ran on ``./.vapora``, ``--config ""`` on the built-in config, ``health --service ""``
    pinged every service)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text
