"""Entry point `tune`: an Optuna study over any trainable entry point, trials as nested MLflow runs."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

import mlflow

from tracking.cli import exit_on_input_error, params_as_dict, parse_bool, parse_params
from tracking.run_context import entry_point_run
from tracking.store import study_for
from tracking.tuning import DEFAULT_STORAGE, TuneError, load_target, make_study, run_study

# Entry points that expose Params / SEARCH_SPACE / OBJECTIVE / execute.
TUNABLE_TARGETS = ("train_predictor", "train_estimator")


@dataclass
class Params:
    """Tune a trainer's hyper-parameters with Optuna."""

    target: str = "train_predictor"
    n_trials: int = 20
    timeout: float = 0.0  # seconds; 0 = no limit
    storage: str = DEFAULT_STORAGE  # any SQLAlchemy URL; PostgreSQL for several workers
    study_name: str = ""  # default: tune-<target>; workers with the same name share one study
    sampler: str = "tpe"
    pruner: str = "median"
    seed: int = 0
    num_epochs: int = 0  # 0 = the target's default epochs per trial
    target_params: str = ""  # fixed for every trial, ';'-separated: "results_dir=data/x;dataset_names=a,b"


def fixed_target_params(text: str, params_cls: type) -> dict[str, object]:
    """`key=value;key=value` -> {key: value typed as the target's Params field}; TuneError naming a bad key."""
    fields = {f.name: f for f in dataclasses.fields(params_cls)}
    out: dict[str, object] = {}
    for item in (part.strip() for part in text.split(";")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise TuneError(f"target_params: {item!r} is not key=value with a parameter of the target "
                            f"(choose from: {', '.join(fields)})")
        kind = fields[key].type if isinstance(fields[key].type, type) else {"int": int, "float": float, "bool": bool}.get(
            str(fields[key].type), str)
        try:
            out[key] = parse_bool(value) if kind is bool else kind(value.strip())
        except (ValueError, argparse.ArgumentTypeError):
            raise TuneError(f"target_params: {key}={value!r} is not a valid {kind.__name__}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="tune")
    if params.n_trials <= 0:
        raise ValueError(f"n_trials must be > 0, got {params.n_trials}")
    module = load_target(params.target, TUNABLE_TARGETS)  # fails before any run is opened
    study_name = params.study_name or f"tune-{params.target}"
    fixed: dict[str, object] = {**fixed_target_params(params.target_params, module.Params), "register": False}
    study = make_study(study_name, params.storage, module.OBJECTIVE.direction, params.sampler, params.pruner, params.seed)
    if params.num_epochs > 0:
        fixed["num_epochs"] = params.num_epochs
    with entry_point_run(
        "tune", params_as_dict(params), run_name=f"tune-{params.target}", study=study_for(params.target)
    ) as run:
        mlflow.set_tags({"optuna_study": study_name, "tune_target": params.target})
        run_study(module, study, params.n_trials, params.timeout or None, fixed_params=fixed)
        finished = [t for t in study.trials if t.value is not None]
        states: dict[str, int] = {}
        for t in study.trials:
            states[t.state.name] = states.get(t.state.name, 0) + 1
        mlflow.log_metrics({f"trials_{state.lower()}": n for state, n in states.items()})
        if finished:
            best = study.best_trial
            mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
            mlflow.log_metric(f"best_{module.OBJECTIVE.metric}", float(best.value))
            mlflow.set_tag("best_trial", str(best.number))
        print(
            f"tune {params.target}: {len(study.trials)} trials in study {study_name!r} "
            f"({', '.join(f'{n} {s.lower()}' for s, n in states.items())}); "
            + (f"best {module.OBJECTIVE.metric}={study.best_value:.6g} with {study.best_params}" if finished else "no finished trial")
            + f"; parent run {run.info.run_id}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
