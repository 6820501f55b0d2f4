"""Entry point `promote`: move an alias (default `champion`) to the best registered version."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import mlflow

from tracking.cli import exit_on_input_error, parse_params, params_as_dict
from tracking.registry import newest_data_digest, promote, require_model
from tracking.run_context import entry_point_run
from tracking.store import configure_tracking


# The held-out figure each registered model is compared by, when -P metric is not given.
DEFAULT_METRICS = {
    "workload-predictor": "test_mae_mean",
    "latency-estimator": "test_mape_mean",  # mean MAPE of vision, prefill, decode per token on held-out samples
}


@dataclass
class Params:
    """Compare registered versions by a held-out metric and alias the best."""

    model_name: str = "workload-predictor"
    metric: str = ""  # empty: the model's held-out metric from DEFAULT_METRICS
    mode: str = "min"  # min | max
    alias: str = "champion"
    version: str = ""  # empty: the best version; else promote this one
    force: bool = False
    # Which versions compete: "newest" = those trained on the same table (data_digest tag) as the
    # newest version, "all" = every version, or a data_digest value.
    table: str = "newest"


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="promote")
    if params.mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {params.mode!r}")
    configure_tracking()
    require_model(params.model_name)  # before a run is opened: nothing to clean up on a typo
    if not params.metric:
        if params.model_name not in DEFAULT_METRICS:
            raise ValueError(f"metric: no default for model {params.model_name!r}; pass -P metric=<held-out metric>")
        params.metric = DEFAULT_METRICS[params.model_name]
    digest = None if params.table == "all" else (
        newest_data_digest(params.model_name, params.metric) if params.table == "newest" else params.table)
    with entry_point_run("promote", params_as_dict(params), run_name=f"promote-{params.model_name}") as run:
        result = promote(
            params.model_name, params.metric, params.mode, params.alias, params.version or None, params.force, digest
        )
        mlflow.set_tags({"promoted_model": params.model_name, "promoted_version": result.version, "changed": str(result.changed),
                         "compared_table": digest if digest is not None else "all"})
        mlflow.log_metric(f"promoted_{params.metric}", result.value)
        verb = "moved" if result.changed else "kept"
        print(
            f"promote: {verb} {params.model_name}@{params.alias} -> version {result.version} "
            f"({params.metric}={result.value:.6g}; previous: {result.previous_champion or 'none'}; compared: "
            f"{'every version' if digest is None else 'versions trained on table ' + (digest or '(untagged)')}); run {run.info.run_id}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
