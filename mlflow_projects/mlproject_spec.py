"""The MLproject file, written from the entry points' Params dataclasses (one source of truth).

    python -m mlflow_projects.mlproject_spec          # rewrite MLproject
    python -m mlflow_projects.mlproject_spec --check  # exit 1 if MLproject is out of date
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path

# entry point name -> python module holding `Params` and `main`
ENTRY_POINT_MODULES: dict[str, str] = {
    "pipeline": "mlflow_projects.pipeline",
    "train_predictor": "entry_points.train_predictor",
    "tune": "entry_points.tune",
    "promote": "entry_points.promote",
    "train_base_model": "entry_points.train_base_model",
    "evaluate_base_model": "entry_points.evaluate_base_model",
    "importance": "entry_points.importance",
    "profile": "entry_points.profile",
    "train_estimator": "entry_points.train_estimator",
    "evaluate_estimator": "entry_points.evaluate_estimator",
    "visualize_estimator": "entry_points.visualize_estimator",
}

MLPROJECT_PATH = Path(__file__).resolve().parents[1] / "MLproject"
TYPE_NAMES = {int: "int", float: "float", bool: "bool", str: "string"}


def _type_name(annotation: object) -> str:
    if isinstance(annotation, str):
        return {"int": "int", "float": "float", "bool": "bool"}.get(annotation, "string")
    return TYPE_NAMES.get(annotation, "string")  # type: ignore[arg-type]


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
    for name, module_name in ENTRY_POINT_MODULES.items():
        params_cls = importlib.import_module(module_name).Params
        lines.append(f"  {name}:")
        lines.append("    parameters:")
        args = []
        for field in dataclasses.fields(params_cls):
            lines.append(f"      {field.name}: {{type: {_type_name(field.type)}, default: {_default(field.default)}}}")
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
