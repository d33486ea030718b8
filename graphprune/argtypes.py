"""Command-line plumbing shared by every parser (`graphprune`, `graphprune analyze`, `graphprune bench`).

It sits at the bottom of the layers so that a measuring module with a command of its own
(graphprune/bench.py) does not import the CLI: exit codes, the parser whose errors are one
line and exit 2, and argparse types that reject bad values with a one-line message.
"""
from __future__ import annotations

import argparse
from typing import Callable

__all__ = ["EXIT_OK", "EXIT_INTERNAL", "EXIT_BAD_INPUT", "ArgParser", "int_at_least", "number_in", "parse_shape", "parse_shapes"]

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


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """`name:1x3x224x224` -> ("name", (1, 3, 224, 224)); BadInputError (one line) otherwise."""
    from .errors import BadInputError

    name, sep, dims = str(text).rpartition(":")
    if not sep or not name or not dims:
        raise BadInputError(f"--shape {text!r}: expected NAME:DxDx... (e.g. input:1x3x224x224)")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise BadInputError(f"--shape {text!r}: dimensions must be positive integers separated by 'x'") from None
    if not shape or any(d < 1 for d in shape):
        raise BadInputError(f"--shape {text!r}: dimensions must be positive integers separated by 'x'")
    return name, shape


def parse_shapes(value) -> dict[str, tuple[int, ...]]:
    """{input name: shape} from NAME:DxD... strings or a dict (the API); the same name twice with
    different shapes is an error."""
    from .errors import BadInputError

    items = value.items() if isinstance(value, dict) else [parse_shape(t) for t in value]
    shapes: dict[str, tuple[int, ...]] = {}
    for name, shape in items:
        try:
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise BadInputError(f"shape of input {name!r} must be a sequence of integers, got {shape!r}") from None
        if not shape or any(d < 1 for d in shape):
            raise BadInputError(f"shape of input {name!r}: dimensions must be positive integers, got {shape}")
        if shapes.get(name, shape) != shape:
            raise BadInputError(f"--shape gives input {name} twice with different shapes")
        shapes[name] = shape
    return shapes
