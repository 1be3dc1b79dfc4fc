"""Two exception types: errors in library words, and the user errors the front ends print.

Library code raises `ArgumentError` (a ValueError) naming its own argument: `window=(0, 8): sizes must
be positive`. The front ends (the CLI, config loading) know which flag or YAML key gave that argument
and turn it into a `UserError` naming it, with `translated`:

    with translated({"window": "--window", "mode": "--mode"}):
        spec = InferenceSpec(mode=args.mode, window=args.window)

The CLI prints a UserError on one line and exits 2. Anything else (a TypeError inside a model
builder, say) is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any


class UserError(Exception):
    """A mistake the user can fix (bad path, bad argument, bad file). The message names the
    file or argument, the value and the way out; it is printed without a traceback."""


class ArgumentError(ValueError):
    """A library function's argument has a value it cannot use.

    Args:
        argument: the parameter's name in the library's signature (e.g. "window").
        value: the value given.
        problem: what is wrong and the way out, e.g. "sizes must be positive".
    """

    def __init__(self, argument: str, value: Any, problem: str) -> None:
        self.argument, self.value, self.problem = argument, value, problem
        super().__init__(f"{argument}={value!r}: {problem}")


@contextlib.contextmanager
def translated(names: Mapping[str, str], *, flags: bool = False) -> Iterator[None]:
    """Re-raise an ArgumentError as a UserError that names the flag or key the argument came from.

    Args:
        names: library argument -> what the user wrote ("--window", "eval.window").
        flags: command-line style (`--window 0 8: ...`) rather than YAML style (`eval.window=[0, 8]: ...`).
    """
    try:
        yield
    except ArgumentError as e:
        name = names.get(e.argument)
        if name is None:
            raise
        value = _as_typed(e.value, flags)
        raise UserError(f"{name} {value}: {e.problem}" if flags else f"{name}={value}: {e.problem}") from None


def _as_typed(value: Any, flags: bool) -> str:
    """A value as the user typed it: `0 8` on a command line, `[0, 8]` in YAML."""
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value) if flags else str(list(value))
    return str(value)
