"""Optuna studies over any trainable entry point, each trial a nested MLflow run.

A trainable entry point module exposes:
  Params         a dataclass of its parameters (defaults in one place)
  SEARCH_SPACE   a list of ParamSpec declared next to the trainer
  OBJECTIVE      an Objective: the held-out metric to optimise and its direction
  execute(params, epoch_hook=None) -> dict of final metrics, run inside an active MLflow run;
                 epoch_hook(epoch, metrics) is called after every epoch.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import random
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Sequence

import mlflow
import optuna
import sqlalchemy.exc
from optuna_integration.mlflow import MLflowCallback

DEFAULT_STORAGE = "sqlite:///optuna.db"
_CREATE_ATTEMPTS = 5


class TuneError(ValueError):
    """A tuning request that cannot run (unknown target, sampler, pruner...)."""


@dataclass(frozen=True)
class FloatParam:
    name: str
    low: float
    high: float
    log: bool = False

    def suggest(self, trial: optuna.Trial) -> float:
        return trial.suggest_float(self.name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class IntParam:
    name: str
    low: int
    high: int
    log: bool = False
    step: int = 1

    def suggest(self, trial: optuna.Trial) -> int:
        return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step)


@dataclass(frozen=True)
class CategoricalParam:
    name: str
    choices: tuple[Any, ...]

    def suggest(self, trial: optuna.Trial) -> Any:
        return trial.suggest_categorical(self.name, list(self.choices))


ParamSpec = FloatParam | IntParam | CategoricalParam


@dataclass(frozen=True)
class Objective:
    metric: str  # a key of the metrics dict that execute() returns (and of the per-epoch metrics)
    direction: str  # "minimize" | "maximize"


SAMPLERS: dict[str, Callable[[int], optuna.samplers.BaseSampler]] = {
    "tpe": lambda seed: optuna.samplers.TPESampler(seed=seed),
    "random": lambda seed: optuna.samplers.RandomSampler(seed=seed),
    "cmaes": lambda seed: optuna.samplers.CmaEsSampler(seed=seed),
}
PRUNERS: dict[str, Callable[[], optuna.pruners.BasePruner]] = {
    "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=5),
    "hyperband": lambda: optuna.pruners.HyperbandPruner(),
    "successive_halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
    "none": lambda: optuna.pruners.NopPruner(),
}


def load_target(target: str, known: Sequence[str]) -> ModuleType:
    """The entry-point module of a trainable target, or TuneError naming the choices."""
    if target not in known:
        raise TuneError(f"target={target!r} is not a tunable entry point (choose from: {', '.join(known)})")
    module = importlib.import_module(f"entry_points.{target}")
    for attr in ("Params", "SEARCH_SPACE", "OBJECTIVE", "execute"):
        if not hasattr(module, attr):
            raise TuneError(f"entry point {target!r} lacks {attr}, so it cannot be tuned")
    return module


def make_study(
    study_name: str, storage: str, direction: str, sampler: str = "tpe", pruner: str = "median", seed: int = 0
) -> optuna.Study:
    if sampler not in SAMPLERS:
        raise TuneError(f"sampler={sampler!r} is unknown (choose from: {', '.join(SAMPLERS)})")
    if pruner not in PRUNERS:
        raise TuneError(f"pruner={pruner!r} is unknown (choose from: {', '.join(PRUNERS)})")
    # load_if_exists: several workers (processes, machines) join one study on a shared RDB storage.
    # Workers started together on a fresh database race to create Optuna's schema; the loser's DDL
    # fails (PostgreSQL: duplicate type/table) and rolls back, and a retry finds the schema in place.
    for attempt in range(_CREATE_ATTEMPTS):
        try:
            return optuna.create_study(
                study_name=study_name,
                storage=storage or DEFAULT_STORAGE,
                direction=direction,
                sampler=SAMPLERS[sampler](seed),
                pruner=PRUNERS[pruner](),
                load_if_exists=True,
            )
        except sqlalchemy.exc.DBAPIError:
            if attempt == _CREATE_ATTEMPTS - 1:
                raise
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def run_study(
    module: ModuleType,
    study: optuna.Study,
    n_trials: int,
    timeout_s: float | None,
    fixed_params: Mapping[str, Any] | None = None,
) -> optuna.Study:
    """Run trials of `module.execute`, each inside a nested MLflow run of the active parent run.

    Per-epoch metrics go to the trial's run and to the pruner; a pruned trial is tagged
    `state=PRUNED` and `pruned=true`.
    """
    objective_spec: Objective = module.OBJECTIVE
    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("run_study needs an active parent MLflow run")
    callback = MLflowCallback(
        metric_name=f"objective_{objective_spec.metric}",  # not the per-epoch name: no step-0 point on that curve
        create_experiment=False,
        mlflow_kwargs={"nested": True},
    )

    @callback.track_in_mlflow()
    def objective(trial: optuna.Trial) -> float:
        suggested = {spec.name: spec.suggest(trial) for spec in module.SEARCH_SPACE}
        params = dataclasses.replace(module.Params(), **{**(fixed_params or {}), **suggested})
        mlflow.set_tags({"optuna_study": study.study_name, "optuna_trial": str(trial.number), "parent_tune_run": parent.info.run_id})
        mlflow.log_params({k: str(v) for k, v in dataclasses.asdict(params).items() if k not in suggested})

        def epoch_hook(epoch: int, metrics: Mapping[str, float]) -> None:
            value = metrics.get(objective_spec.metric)
            if value is None or not math.isfinite(value):
                return
            trial.report(float(value), step=epoch)
            if trial.should_prune():
                trial.set_user_attr("pruned", "true")
                trial.set_user_attr("pruned_at_epoch", epoch)
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        metrics = module.execute(params, epoch_hook=epoch_hook)
        return float(metrics[objective_spec.metric])

    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, callbacks=[callback], catch=())
    return study
