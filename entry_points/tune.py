"""Entry point `tune`: an Optuna study over any trainable entry point, trials as nested MLflow runs."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow

from entry_points import catalog
from tracking.cli import ParameterError, parse_value
from tracking.entry_point import EntryPoint
from tracking.tuning import DEFAULT_STORAGE, TuneError, make_study, run_study, study_outcome


@dataclass
class Params:
    """Tune a trainer's hyper-parameters with Optuna."""

    target: str = "train_predictor"  # a trainer that declares a search space (train_predictor, train_estimator)
    n_trials: int = 20
    timeout: float = 0.0  # seconds; 0 = no limit
    storage: str = DEFAULT_STORAGE  # any SQLAlchemy URL; PostgreSQL for several workers
    study_name: str = ""  # default: tune-<target>; workers with the same name share one study
    sampler: str = "tpe"  # tpe | random | cmaes
    pruner: str = "median"  # median | hyperband | successive_halving | none
    seed: int = 0
    num_epochs: int = 0  # 0 = the target's default epochs per trial
    target_params: str = ""  # fixed for every trial, ';'-separated: "results_dir=data/x;dataset_names=a,b"


@dataclass
class Prepared:
    target: EntryPoint
    fixed: dict[str, Any]
    study: Any


def fixed_target_params(text: str, params_cls: type) -> dict[str, object]:
    """`key=value;key=value` -> {key: value typed as the target's Params field}; ParameterError naming a bad key."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    out: dict[str, object] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ParameterError(f"target_params: {item!r} is not key=value with a parameter of the target "
                                 f"(choose from: {', '.join(fields)})")
        out[key] = parse_value(fields[key], value)
    return out


def prepare(params: Params) -> Prepared:
    if params.n_trials <= 0:
        raise ParameterError(f"n_trials must be > 0, got {params.n_trials}")
    if params.target not in catalog.MODULES or catalog.load(params.target).tuning is None:
        raise TuneError(f"target={params.target!r} is not a tunable entry point (choose from: {', '.join(catalog.tunable())})")
    target = catalog.load(params.target)
    fixed: dict[str, Any] = {**fixed_target_params(params.target_params, target.params), "register": False}
    if params.num_epochs > 0:
        fixed["num_epochs"] = params.num_epochs
    study = make_study(params.study_name or f"tune-{params.target}", params.storage, target.tuning.objective.direction,
                       params.sampler, params.pruner, params.seed)
    return Prepared(target, fixed, study)


def execute(params: Params, prepared: Prepared) -> Mapping[str, float]:
    mlflow.set_tags({"optuna_study": prepared.study.study_name, "tune_target": params.target})
    run_study(prepared.target, prepared.study, params.n_trials, params.timeout or None, fixed_params=prepared.fixed)
    return study_outcome(prepared.study, prepared.target.tuning.objective)


def summary(params: Params, metrics: Mapping[str, float]) -> str:
    finished = int(metrics.get("trials_complete", 0))
    trials = ", ".join(f"{int(v)} {k[len('trials_'):]}" for k, v in metrics.items() if k.startswith("trials_"))
    best = [k for k in metrics if k.startswith("best_")]
    return (f"{params.target}: {trials} in study {params.study_name or 'tune-' + params.target!r}; "
            + (f"best {best[0][5:]}={metrics[best[0]]:.6g}" if finished and best else "no finished trial"))


# The study's runs go to the target's experiment, so trials sit beside the target's ordinary runs.
ENTRY_POINT = EntryPoint(
    "tune", Params, study=lambda params: catalog.load(params.target).study_for(), execute=execute, summary=summary,
    prepare=prepare,
    run_name=lambda params: f"tune-{params.target}",
)
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
