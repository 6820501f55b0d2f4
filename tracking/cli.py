"""Entry-point command lines: parameters declared once as a dataclass, bad input as one clear line.

`mlflow run . -e NAME -P key=value` calls `python -m entry_points.NAME --key value`; the same
dataclass is the MLproject's parameter list (a test keeps the two in step).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from typing import Any, Callable, Sequence, TypeVar

from tracking.store import TrackingServerError

P = TypeVar("P")

# Errors that mean "the user's input is wrong": reported as one line, exit code 2.
# Core modules raise ValueError subclasses (TraceError, ForecastDataError, KnobOutOfSpaceError, ...).
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)


class ParameterError(ValueError):
    """A command-line parameter with a value that cannot be used."""


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in {"1", "true", "yes", "y", "on"}:
        return True
    if lowered in {"0", "false", "no", "n", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def parse_params(params_cls: type[P], argv: Sequence[str] | None = None, prog: str | None = None) -> P:
    """Build an argparse parser from a params dataclass and parse `argv`."""
    parser = argparse.ArgumentParser(prog=prog, description=(params_cls.__doc__ or "").strip())
    for field in dataclasses.fields(params_cls):  # type: ignore[arg-type]
        kind = field.type if isinstance(field.type, type) else {"int": int, "float": float, "bool": bool}.get(
            str(field.type), str
        )
        parser.add_argument(
            f"--{field.name}",
            type=parse_bool if kind is bool else kind,
            default=field.default,
            help=f"(default: {field.default!r})",
        )
    namespace = parser.parse_args(argv)
    return params_cls(**vars(namespace))


def params_as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def exit_on_input_error(main: Callable[[], int | None]) -> int:
    """Run `main`; turn input errors into one line on stderr and exit code 2.

    Set PLATFORM_DEBUG=1 for the full traceback.
    """
    try:
        return int(main() or 0)
    except INPUT_ERRORS as exc:
        if os.environ.get("PLATFORM_DEBUG"):
            traceback.print_exc()
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 2
    except TrackingServerError as exc:
        if os.environ.get("PLATFORM_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 3
