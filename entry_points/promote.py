"""Entry point `promote`: move an alias (default `champion`) to the best registered version."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Mapping

import mlflow

from tracking.cli import ParameterError
from tracking.entry_point import EntryPoint
from tracking.registry import (
    Promotion, Requirement, competing_versions, declared_promotion, newest_data_digest, parse_requirement, promote,
)
from tracking.store import PROMOTION_STUDY


@dataclass
class Params:
    """Compare registered versions by a held-out metric and alias the best."""

    model_name: str = "workload-predictor"
    metric: str = ""  # empty: the held-out metric the model's trainer declared
    mode: str = ""  # min | max; empty: the trainer's declared direction
    alias: str = "champion"
    version: str = ""  # empty: the best version; else promote this one
    force: bool = False  # move the alias even to a worse version
    # Which versions compete: "newest" = those trained on the same table (data_digest tag) as the
    # newest version, "all" = every version, or a data_digest value.
    table: str = "newest"
    # Constraints a version's run must meet to become champion, comma-separated <metric><op><number>
    # (op: >=, <=, >, <, ==), e.g. "test_adherence_min>=0.97"; versions failing one are excluded.
    require: str = ""


@dataclass
class Prepared:
    promotion: Promotion
    digest: str | None  # None: every version competes
    require: tuple[Requirement, ...] = ()


def prepare(params: Params) -> Prepared:
    """The metric and direction (given, or the trainer's declaration) and the table that competes."""
    if params.mode not in ("", "min", "max"):
        raise ParameterError(f"mode must be 'min' or 'max', got {params.mode!r}")
    require = tuple(parse_requirement(text) for text in params.require.split(",") if text.strip())
    declared = declared_promotion(params.model_name)  # a typo fails here, before a run is opened
    if not params.metric and declared is None:
        raise ParameterError(f"metric: model {params.model_name!r} declares no promotion metric; pass -P metric=<held-out metric>")
    metric = params.metric or declared.metric  # type: ignore[union-attr]
    mode = params.mode or (declared.mode if declared is not None and declared.metric == metric else "min")
    digest = None if params.table == "all" else (
        newest_data_digest(params.model_name, metric) if params.table == "newest" else params.table)
    competing_versions(params.model_name, metric, digest)  # a table no version was trained on: said here
    return Prepared(Promotion(params.model_name, metric, mode), digest, require)


def execute(params: Params, prepared: Prepared) -> dict[str, Any]:
    p = prepared.promotion
    result = promote(p.model_name, p.metric, p.mode, params.alias, params.version or None, params.force, prepared.digest,
                     prepared.require)
    table = prepared.digest if prepared.digest is not None else "all"
    mlflow.set_tags({"promoted_model": p.model_name, "promoted_version": result.version, "changed": str(result.changed),
                     "promoted_metric": p.metric, "promoted_mode": p.mode, "compared_table": table})
    if prepared.require:
        mlflow.set_tags({"promotion_require": ",".join(map(str, prepared.require)),
                         "excluded_versions": excluded_text(result.excluded) or "none"})
    mlflow.log_metric(f"promoted_{p.metric}", result.value)
    return {"promotion": p, "result": result, "table": table}


def excluded_text(excluded: tuple[tuple[str, str], ...]) -> str:
    return "; ".join(f"version {version} ({why})" for version, why in excluded)


def summary(params: Params, outcome: Mapping[str, Any]) -> str:
    p, result, table = outcome["promotion"], outcome["result"], outcome["table"]
    excluded = f"; excluded: {excluded_text(result.excluded)}" if result.excluded else ""
    return (f"{'moved' if result.changed else 'kept'} {p.model_name}@{params.alias} -> version {result.version} "
            f"({p.metric}={result.value:.6g}, {p.mode} wins; previous: {result.previous_champion or 'none'}; compared: "
            f"{'every version' if table == 'all' else 'versions trained on table ' + (table or '(untagged)')}{excluded})")


ENTRY_POINT = EntryPoint("promote", Params, study=PROMOTION_STUDY, execute=execute, summary=summary, prepare=prepare,
                         run_name=lambda params: f"promote-{params.model_name}")
main = ENTRY_POINT.main

if __name__ == "__main__":
    sys.exit(main())
