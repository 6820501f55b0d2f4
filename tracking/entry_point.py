"""The skeleton every entry point shares: params -> tracking URI -> validation -> run -> summary -> exit code.

An entry-point module declares its `Params` dataclass and three functions, and hands them to
`EntryPoint`:

    prepare(params) -> prepared          checks every input before a run opens (bad input: one line, exit 2)
    execute(params, prepared, epoch_hook=None) -> outcome
                                         the work, inside the active MLflow run; the outcome is a dict
                                         (a trainer's final metrics; tune reads its objective from it)
    summary(params, outcome) -> str      the report printed after the run (run id appended to its first line)

Optionally `check(params)`: the checks that need the parameters alone (no file, registry or earlier
run): `prepare` runs it, and the pipeline runs every step's before its first step starts.

Every entry point gets the run lifecycle of tracking.run_context: RUNNING runs left by a process
that is gone are marked FAILED (error=orphaned) first, and said so; input errors under `mlflow run`
end its run FAILED with the `error` tag; SIGTERM ends the run FAILED; a tracking server that dies
mid-run ends the process in one line naming the checkpoint (exit 3).

A trainer also declares `tuning` (search space and objective: `tune` reads them from here) and
`promotion` (which registered model, held-out metric and direction: stored on the registered model,
where `promote` reads it).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Generic, Mapping, Sequence, TypeVar

from tracking.cli import INPUT_ERRORS, exit_on_input_error, params_as_dict, parse_params
from tracking.registry import Promotion
from tracking.run_context import (
    checkpoint_note, entry_point_run, fail_run, sweep_orphaned_runs, tracking_server_lost,
)
from tracking.store import TrackingServerError, configure_tracking, redact, tracking_uri
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
    check: Callable[[P], None] | None = None  # parameter-only checks (see the module docstring)

    def study_for(self, params: P | None = None) -> str:
        if callable(self.study):
            return self.study(params if params is not None else self.params())
        return self.study

    def checked_prepare(self, params: P) -> Any:
        """`check` (if declared), then `prepare`."""
        if self.check is not None:
            self.check(params)
        return self.prepare(params)

    def run(self, params: P) -> tuple[str, Mapping[str, Any]]:
        """Validate, then execute inside a new run (or the one `mlflow run` opened); (run id, outcome)."""
        configure_tracking()  # a dead server is one line before any work starts
        if orphaned := sweep_orphaned_runs():
            print(f"note: {len(orphaned)} run(s) left RUNNING by a process that is gone marked FAILED "
                  f"(error=orphaned): {', '.join(orphaned)}", file=sys.stderr)
        try:
            prepared = self.checked_prepare(params)  # bad input fails here, before a run is opened
        except INPUT_ERRORS as exc:
            if os.environ.get("MLFLOW_RUN_ID"):  # `mlflow run` opened the run already: it ends FAILED, with the error
                fail_run(os.environ["MLFLOW_RUN_ID"], exc)
            raise
        run_id = ""
        try:
            with entry_point_run(
                self.name, params_as_dict(params), study=self.study_for(params),
                run_name=self.run_name(params) if self.run_name else None,
                log_system_metrics=bool(getattr(params, "log_system_metrics", False)),
            ) as active:
                run_id = active.info.run_id
                outcome = self.execute(params, prepared)
        except Exception as exc:
            if (reason := tracking_server_lost()) is not None:
                raise TrackingServerError(f"tracking server {redact(tracking_uri())} stopped answering during run "
                                          f"{run_id or '(not opened)'} ({reason}); {checkpoint_note()}") from exc
            raise
        return run_id, outcome

    def main(self, argv: Sequence[str] | None = None) -> int:
        """Command-line entry: parse, run, print the summary line; input errors exit 2 in one line."""

        def body() -> int:
            params = parse_params(self.params, argv, prog=self.name)
            run_id, outcome = self.run(params)
            headline, *details = self.summary(params, outcome).split("\n")
            print("\n".join([f"{self.name}: {headline}; run {run_id}", *details]))
            return 0

        return exit_on_input_error(body)
