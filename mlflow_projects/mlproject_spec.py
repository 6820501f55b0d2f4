"""The MLproject file, written from the entry points' Params dataclasses (one source of truth).

    python -m mlflow_projects.mlproject_spec          # rewrite MLproject
    python -m mlflow_projects.mlproject_spec --check  # exit 1 if MLproject is out of date
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from entry_points.catalog import MODULES, load
from tracking.cli import field_help, field_kind

MLPROJECT_PATH = Path(__file__).resolve().parents[1] / "MLproject"
TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "string"}


def _default(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '""' if value == "" else (f'"{value}"' if any(c in value for c in ":#{}[],&*?|<>=!%@`'\"") else value)
    return repr(value)


def render() -> str:
    lines = [
        "# Written by `python -m mlflow_projects.mlproject_spec` from the entry points' Params dataclasses.",
        "# Run with: mlflow run . -e NAME --env-manager local -P key=value",
        "name: adaptive-moe-vlm-platform",
        "",
        "conda_env: conda.yaml",
        "",
        "entry_points:",
    ]
    for name, module_name in MODULES.items():
        params_cls = load(name).params
        helps = field_help(params_cls)
        lines.append(f"  {name}:")
        lines.append("    parameters:")
        args = []
        for field in dataclasses.fields(params_cls):
            comment = f"  # {helps[field.name]}" if field.name in helps else ""
            kind = TYPE_NAMES[field_kind(field)]
            lines.append(f"      {field.name}: {{type: {kind}, default: {_default(field.default)}}}{comment}")
            args.append(f"--{field.name} {{{field.name}}}")
        lines.append(f"    command: \"python -m {module_name} {' '.join(args)}\"")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not MLPROJECT_PATH.exists() or MLPROJECT_PATH.read_text() != text:
            print("MLproject is out of date: run python -m mlflow_projects.mlproject_spec", file=sys.stderr)
            return 1
        return 0
    MLPROJECT_PATH.write_text(text)
    print(f"wrote {MLPROJECT_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
