"""Optuna studies over any trainable entry point, each trial a nested MLflow run.

A trainable entry point (`tracking.entry_point.EntryPoint`) declares `tuning`: its search space
and objective, next to the trainer. Its `prepare(params)` and `execute(params, prepared,
epoch_hook)` run each trial inside an active MLflow run; `epoch_hook(epoch, metrics)` is called
after every epoch (the pruner's report).
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import mlflow
import optuna
import sqlalchemy.exc
from optuna_integration.mlflow import MLflowCallback

from tracking.store import redact

if TYPE_CHECKING:
    from tracking.entry_point import EntryPoint

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


@dataclass(frozen=True)
class Tuning:
    """What `tune` may vary in a trainer, and what it optimises."""

    search_space: Sequence["ParamSpec"]
    objective: Objective


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
        except ImportError as exc:
            raise TuneError(f"storage={redact(storage)}: {exc} (e.g. postgresql+psycopg2://... uses the installed driver)") from None
        except sqlalchemy.exc.DBAPIError as exc:
            if attempt == _CREATE_ATTEMPTS - 1:
                # One line, password redacted: a wrong password or an unreachable database is an input error.
                reason = " ".join(str(exc.orig or exc).split())[:300]
                raise TuneError(f"storage={redact(storage)}: cannot open the Optuna storage ({redact(reason)})") from None
            time.sleep(0.2 * (attempt + 1) + random.random() * 0.3)
    raise AssertionError("unreachable")


def run_study(
    entry: "EntryPoint",
    study: optuna.Study,
    n_trials: int,
    timeout_s: float | None,
    fixed_params: Mapping[str, Any] | None = None,
) -> optuna.Study:
    """Run trials of `entry.execute`, each inside a nested MLflow run of the active parent run.

    Per-epoch metrics go to the trial's run and to the pruner; a pruned trial is tagged
    `state=PRUNED` and `pruned=true`.
    """
    if entry.tuning is None:
        raise TuneError(f"entry point {entry.name!r} declares no search space, so it cannot be tuned")
    objective_spec = entry.tuning.objective
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
        suggested = {spec.name: spec.suggest(trial) for spec in entry.tuning.search_space}
        params = dataclasses.replace(entry.params(), **{**(fixed_params or {}), **suggested})
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

        metrics = entry.execute(params, entry.checked_prepare(params), epoch_hook=epoch_hook)
        return float(metrics[objective_spec.metric])

    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, callbacks=[callback], catch=())
    return study


def study_outcome(study: optuna.Study, objective: Objective) -> dict[str, float]:
    """Log the study's trial counts by state, the best trial's params and value on the active run;
    returns them (`trials_<state>`, `best_<objective metric>`)."""
    states: dict[str, int] = {}
    for trial in study.trials:
        states[trial.state.name] = states.get(trial.state.name, 0) + 1
    metrics: dict[str, float] = {f"trials_{state.lower()}": float(n) for state, n in states.items()}
    if any(t.value is not None for t in study.trials):
        best = study.best_trial
        mlflow.log_params({f"best_{k}": v for k, v in best.params.items()})
        mlflow.set_tag("best_trial", str(best.number))
        metrics[f"best_{objective.metric}"] = float(best.value)
    mlflow.log_metrics(metrics)
    return metrics
