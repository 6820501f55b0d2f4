"""The skeleton every entry point shares: params -> tracking URI -> validation -> run -> summary -> exit code.

An entry-point module declares its `Params` dataclass and three functions, and hands them to
`EntryPoint`:

    prepare(params) -> prepared          checks every input before a run opens (bad input: one line, exit 2)
    execute(params, prepared, epoch_hook=None) -> outcome
                                         the work, inside the active MLflow run; the outcome is a dict
                                         (a trainer's final metrics; tune reads its objective from it)
    summary(params, outcome) -> str      the report printed after the run (run id appended to its first line)

A trainer also declares `tuning` (search space and objective: `tune` reads them from here) and
`promotion` (which registered model, held-out metric and direction: stored on the registered model,
where `promote` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

from tracking.cli import exit_on_input_error, params_as_dict, parse_params
from tracking.registry import Promotion
from tracking.run_context import entry_point_run
from tracking.store import configure_tracking
from tracking.tuning import Tuning

P = TypeVar("P")
EpochHook = Callable[[int, Mapping[str, float]], None]


def _nothing_to_prepare(params: Any) -> None:
    return None


@dataclass(frozen=True)
class EntryPoint(Generic[P]):
    name: str  # the MLproject entry-point name
    params: type[P]
    study: str | Callable[[P], str]  # the MLflow experiment its runs go to (or a function of the params)
    execute: Callable[..., Mapping[str, Any]]
    summary: Callable[[P, Mapping[str, Any]], str]
    prepare: Callable[[P], Any] = _nothing_to_prepare
    run_name: Callable[[P], str] | None = None
    tuning: Tuning | None = None
    promotion: Promotion | None = None

    def study_for(self, params: P | None = None) -> str:
        if callable(self.study):
            return self.study(params if params is not None else self.params())
        return self.study

    def run(self, params: P) -> tuple[str, Mapping[str, Any]]:
        """Validate, then execute inside a new run (or the one `mlflow run` opened); (run id, outcome)."""
        configure_tracking()  # a dead server is one line before any work starts
        prepared = self.prepare(params)  # bad input fails here, before a run is opened
        with entry_point_run(
            self.name, params_as_dict(params), study=self.study_for(params),
            run_name=self.run_name(params) if self.run_name else None,
            log_system_metrics=bool(getattr(params, "log_system_metrics", False)),
        ) as active:
            outcome = self.execute(params, prepared)
        return active.info.run_id, outcome

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Command-line entry: parse, run, print the summary line; input errors exit 2 in one line."""

        def body() -> int:
            params = parse_params(self.params, argv, prog=self.name)
            run_id, outcome = self.run(params)
            headline, *details = self.summary(params, outcome).split("\n")
            print("\n".join([f"{self.name}: {headline}; run {run_id}", *details]))
            return 0

        return exit_on_input_error(body)
