"""Entry-point command lines: parameters declared once as a dataclass, bad input as one clear line.

`mlflow run . -e NAME -P key=value` calls `python -m <module> --key value`; the same dataclass is
the MLproject's parameter list (a test keeps the two in step). A field's trailing `# comment` is its
help text, in `--help` and in the MLproject file.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import traceback
from functools import lru_cache
from typing import Any, Callable, Sequence, TypeVar

from tracking.run_context import RunTerminated
from tracking.store import TrackingServerError, redact

P = TypeVar("P")

# Errors that mean "the user's input is wrong": reported as one line, exit code 2.
# Core modules raise ValueError subclasses (TraceError, ForecastDataError, KnobOutOfSpaceError, ...).
INPUT_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotADirectoryError, KeyError)
_KINDS: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str}


class ParameterError(ValueError):
    """A command-line parameter with a value that cannot be used."""


def parse_bool(text: str) -> bool:
    lowered = str(text).strip().lower()
    if lowered in {"1", "true", "yes", "y", "on"}:
        return True
    if lowered in {"0", "false", "no", "n", "off", ""}:
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def field_kind(field: dataclasses.Field) -> type:
    """int, float, bool or str: a Params field's type (annotations are strings under `from __future__`)."""
    if isinstance(field.type, type):
        return field.type
    return _KINDS.get(str(field.type), str)


def parse_value(field: dataclasses.Field, text: str) -> Any:
    """`text` as the field's type; ParameterError naming the field otherwise."""
    kind = field_kind(field)
    try:
        return parse_bool(text) if kind is bool else kind(str(text).strip())
    except (ValueError, argparse.ArgumentTypeError):
        raise ParameterError(f"{field.name}={text!r} is not a valid {kind.__name__}") from None


@lru_cache(maxsize=None)
def field_help(params_cls: type) -> dict[str, str]:
    """Each field's trailing `# comment` in the class source (the parameter's documentation); a field
    a subclass redeclares without a comment keeps its base class's."""
    out: dict[str, str] = {}
    for cls in reversed(params_cls.__mro__[:-1]):  # bases first: a subclass's comment wins
        out.update(_own_field_help(cls))
    return out


def _own_field_help(params_cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(params_cls))
    except (OSError, TypeError):
        return {}
    comments = {tok.start[0]: tok.string.lstrip("#").strip()
                for tok in tokenize.generate_tokens(io.StringIO(source).readline) if tok.type == tokenize.COMMENT}
    out: dict[str, str] = {}
    for node in ast.parse(source).body[0].body:  # type: ignore[attr-defined]
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.end_lineno in comments:
            out[node.target.id] = comments[node.end_lineno]
    return out


def parse_params(params_cls: type[P], argv: Sequence[str] | None = None, prog: str | None = None) -> P:
    """Build an argparse parser from a params dataclass (help from the field comments) and parse `argv`."""
    parser = argparse.ArgumentParser(prog=prog, description=(params_cls.__doc__ or "").strip())
    helps = field_help(params_cls)
    for field in dataclasses.fields(params_cls):  # type: ignore[arg-type]
        kind = field_kind(field)
        help_text = helps.get(field.name, "")
        parser.add_argument(
            f"--{field.name}",
            type=parse_bool if kind is bool else kind,
            default=field.default,
            help=f"{help_text} (default: {field.default!r})".strip(),
        )
    namespace = parser.parse_args(argv)
    return params_cls(**vars(namespace))


def params_as_dict(params: Any) -> dict[str, Any]:
    return dataclasses.asdict(params)


def comma_list(text: str, parameter: str, choices: Sequence[str] | None = None, allow_empty: bool = True) -> list[str]:
    """`"a, b,c"` -> ["a", "b", "c"]; with `choices`, every item must be one of them.

    ParameterError names the parameter, the unknown items and the choices.
    """
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items and not allow_empty:
        raise ParameterError(f"{parameter}: empty (choose from: {', '.join(choices or ())})")
    if choices is not None:
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise ParameterError(f"{parameter}: unknown value(s) {unknown} (choose from: {', '.join(choices)})")
    return items


def number_list(text: str, parameter: str) -> tuple[float, ...]:
    """`"0.1, 0.2,0.7"` -> (0.1, 0.2, 0.7); ParameterError naming the parameter (the core config checks the count)."""
    try:
        return tuple(float(item) for item in comma_list(text, parameter))
    except ValueError:
        raise ParameterError(f"{parameter}: {text!r} is not a comma-separated list of numbers") from None


def exit_on_input_error(main: Callable[[], int | None]) -> int:
    """Run `main`; turn input errors into one line on stderr and exit code 2 (3: tracking server down,
    143: SIGTERM; the run already ended FAILED).

    Set PLATFORM_DEBUG=1 for the full traceback.
    """
    try:
        return int(main() or 0)
    except INPUT_ERRORS as exc:
        if os.environ.get("PLATFORM_DEBUG"):
            traceback.print_exc()
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {redact(str(message))}", file=sys.stderr)
        return 2
    except TrackingServerError as exc:
        if os.environ.get("PLATFORM_DEBUG"):
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except RunTerminated as exc:
        print(f"error: {exc}; the run was ended FAILED", file=sys.stderr)
        return 128 + 15


def config_from_params(config_cls: type[P], params: Any, **overrides: Any) -> P:
    """A core config dataclass filled from the same-named fields of an entry point's Params.

    The core config holds the defaults; Params repeats the names (so they reach the command line
    and the MLproject file) with defaults read from the core config, never copied by hand.
    """
    names = {f.name for f in dataclasses.fields(config_cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in dataclasses.asdict(params).items() if k in names}
    return config_cls(**{**values, **overrides})
