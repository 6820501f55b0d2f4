"""Model registry: register, alias, load by alias, and promotion by a held-out metric."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient


class RegistryError(ValueError):
    """A registered model, version or alias that does not exist, or a refused promotion."""


def require_model(name: str, client: MlflowClient | None = None) -> None:
    client = client or MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} does not exist in {mlflow.get_tracking_uri()}") from None


def register(model_uri: str, name: str, tags: dict[str, str] | None = None) -> str:
    """Register `model_uri` under `name`; returns the new version number as a string."""
    version = mlflow.register_model(model_uri, name, tags=tags)
    return str(version.version)


def set_alias(name: str, alias: str, version: str) -> None:
    MlflowClient().set_registered_model_alias(name, alias, str(version))


def version_by_alias(name: str, alias: str) -> str:
    require_model(name)
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no alias {alias!r}") from None


def model_uri_by_alias(name: str, alias: str = "champion") -> str:
    version_by_alias(name, alias)  # fail with a clear line if the alias is missing
    return f"models:/{name}@{alias}"


def load_by_alias(name: str, alias: str = "champion"):
    """Load the pyfunc model that `alias` points to."""
    return mlflow.pyfunc.load_model(model_uri_by_alias(name, alias))


@dataclass(frozen=True)
class CandidateVersion:
    version: str
    run_id: str
    value: float
    data_digest: str = ""  # the source run's `data_digest` tag: which table it was trained and scored on


def candidate_versions(name: str, metric: str, data_digest: str | None = None) -> list[CandidateVersion]:
    """Every version of `name` whose source run logged `metric` (held out), with its value; with
    `data_digest`, only versions whose run was trained on that table."""
    client = MlflowClient()
    require_model(name, client)
    out = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        if not mv.run_id:
            continue
        run = client.get_run(mv.run_id)
        value, digest = run.data.metrics.get(metric), run.data.tags.get("data_digest", "")
        if value is not None and (data_digest is None or digest == data_digest):
            out.append(CandidateVersion(str(mv.version), mv.run_id, float(value), digest))
    return sorted(out, key=lambda c: int(c.version))


def newest_data_digest(name: str, metric: str) -> str:
    """The table (data_digest tag) of the newest version of `name` that logged `metric`."""
    candidates = candidate_versions(name, metric)
    if not candidates:
        raise RegistryError(f"no version of {name!r} has a logged metric {metric!r}")
    return candidates[-1].data_digest


@dataclass(frozen=True)
class PromotionResult:
    version: str
    value: float
    previous_champion: str | None
    previous_value: float | None
    changed: bool


def promote(
    name: str, metric: str, mode: str = "min", alias: str = "champion", version: str | None = None, force: bool = False,
    data_digest: str | None = None,
) -> PromotionResult:
    """Move `alias` to the best version by `metric` (or to `version`), among the versions trained on
    table `data_digest` when given (held-out figures of different tables do not compare).

    Refuses (RegistryError) to replace a champion whose metric is better, unless `force`; a
    champion trained on another table than `data_digest` is not a rival.
    """
    if mode not in ("min", "max"):
        raise RegistryError(f"mode must be 'min' or 'max', got {mode!r}")
    candidates = candidate_versions(name, metric, data_digest)
    if not candidates:
        raise RegistryError(f"no version of {name!r} has a logged metric {metric!r}")
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    by_version = {c.version: c for c in candidates}
    if version:
        if version not in by_version:
            scope = f" (among versions trained on table {data_digest})" if data_digest is not None else ""
            raise RegistryError(f"version {version} of {name!r} does not exist or lacks metric {metric!r}{scope}")
        chosen = by_version[version]
    else:
        chosen = min(candidates, key=lambda c: c.value if mode == "min" else -c.value)

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, alias)
        current_version: str | None = str(current.version)
    except MlflowException:
        current_version = None
    current_value = by_version[current_version].value if current_version in by_version else None

    if current_version == chosen.version:
        return PromotionResult(chosen.version, chosen.value, current_version, current_value, changed=False)
    if current_value is not None and better(current_value, chosen.value) and not force:
        raise RegistryError(
            f"refusing to move {name}@{alias} from version {current_version} ({metric}={current_value:.6g}) "
            f"to worse version {chosen.version} ({metric}={chosen.value:.6g}); pass force=true to override"
        )
    client.set_registered_model_alias(name, alias, chosen.version)
    for key, value in {
        "promoted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "metric": metric,
        "value": f"{chosen.value:.10g}",
        "previous_champion": current_version or "none",
        "promoted_alias": alias,
    }.items():
        client.set_model_version_tag(name, chosen.version, key, value)
    return PromotionResult(chosen.version, chosen.value, current_version, current_value, changed=True)
