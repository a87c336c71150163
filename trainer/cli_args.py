"""Argument types of the `loom` command line: counts and sizes refused when zero or negative,
free text refused when empty or not UTF-8, and an argparse whose errors are one line.

Each refusal names the argument, as every other user error of the CLI does (one `error: ...`
line on stderr, exit code 2)."""
from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one `error: ...` line (no usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n")


def count(minimum: int):
    """argparse type: an integer >= minimum, refused naming the value otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def counts(minimum: int):
    """argparse type: comma-separated integers, each >= minimum."""
    one = count(minimum)

    def parse(text: str) -> list[int]:
        values = [one(x.strip()) for x in text.split(",") if x.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        return values
    parse.__name__ = "comma-separated integers"
    return parse


def text_arg(name: str, text: str | None) -> str | None:
    """A free-text argument: refused when empty or not UTF-8 (bytes the shell passed undecoded)."""
    if text is None:
        return None
    if not text.strip():
        raise ValueError(f"{name} is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{name} is not UTF-8 text") from None
    return text
