"""Every MLproject entry point by name: the module that holds its `Params` and `ENTRY_POINT`.

The MLproject file, `tune` (which trainers it may tune) and the pipeline (which experiment a step's
runs go to) read entry points from here; `tracking/` never imports an entry point by name.
"""

from __future__ import annotations

import importlib

from tracking.entry_point import EntryPoint

MODULES: dict[str, str] = {
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
    "build_controller_data": "entry_points.build_controller_data",
    "train_supervised_controller": "entry_points.train_supervised_controller",
    "train_two_stage_controller": "entry_points.train_two_stage_controller",
    "train_grpo_controller": "entry_points.train_grpo_controller",
    "train_joint_controller": "entry_points.train_joint_controller",
    "evaluate_controller": "entry_points.evaluate_controller",
    "adaptive_inference": "entry_points.adaptive_inference",
}


def load(name: str) -> EntryPoint:
    """The declared entry point `name`; ValueError naming the known ones."""
    if name not in MODULES:
        raise ValueError(f"{name!r} is not an entry point (choose from: {', '.join(MODULES)})")
    return importlib.import_module(MODULES[name]).ENTRY_POINT


def tunable() -> list[str]:
    """Names of the entry points that declare a search space (imports every entry point)."""
    return [name for name in MODULES if load(name).tuning is not None]
