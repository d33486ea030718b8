"""Command-line plumbing shared by every parser (`graphprune`, `graphprune analyze`, `graphprune bench`).

It sits at the bottom of the layers so that a measuring module with a command of its own
(graphprune/bench.py) does not import the CLI: exit codes, the parser whose errors are one
line and exit 2, and argparse types that reject bad values with a one-line message.
"""
from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["EXIT_OK", "EXIT_INTERNAL", "EXIT_BAD_INPUT", "ArgParser", "int_at_least", "number_in"]

EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT = 0, 1, 2


class ArgParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line and exit 2 (bad input)."""

    def error(self, message: str):  # one line, exit 2
        self.exit(EXIT_BAD_INPUT, f"graphprune: error: {message} (see --help)\n")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `lo`, else a one-line parser error."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} must be >= {lo}")
        return v

    return parse


def number_in(check: Callable[[float], str | None]) -> Callable[[str], float]:
    """An argparse type: a float that `check` accepts (`check` returns None, or what is wrong)."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        problem = check(v)
        if problem:
            raise argparse.ArgumentTypeError(problem)
        return v

    return parse
