"""Model registry: each trainer's declared promotion metric, and promotion of the best version by it."""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Sequence

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


def version_by_alias(name: str, alias: str) -> str:
    require_model(name)
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no alias {alias!r}") from None


def resolved_version(ref: str) -> str:
    """The registered version a models:/ URI names ('models:/name@alias' or 'models:/name/3'), as
    'name/version'; '' for a path or a run reference. RegistryError (one line) when it names nothing."""
    if not ref.startswith("models:/"):
        return ""
    name_version = ref[len("models:/"):].strip("/")
    if "@" in name_version:
        name, alias = name_version.split("@", 1)
        return f"{name}/{version_by_alias(name, alias)}"
    name, _, number = name_version.rpartition("/")
    require_model(name)
    try:
        MlflowClient().get_model_version(name, number)
    except MlflowException:
        raise RegistryError(f"registered model {name!r} has no version {number!r}") from None
    return f"{name}/{number}"


@dataclass(frozen=True)
class Promotion:
    """How a trainer's registered model is compared: its held-out metric and direction.

    Declared once by the trainer, stored as tags on the registered model when a version is
    registered, and read back by `promote` (so `-P model_name=...` is all it needs).
    """

    model_name: str
    metric: str
    mode: str  # "min" | "max"

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ValueError(f"promotion mode must be 'min' or 'max', got {self.mode!r}")


PROMOTION_METRIC_TAG, PROMOTION_MODE_TAG = "promotion_metric", "promotion_mode"


def record_promotion(promotion: Promotion, name: str | None = None) -> None:
    """Store the promotion metric and mode on registered model `name` (default: promotion.model_name)."""
    client = MlflowClient()
    name = name or promotion.model_name
    client.set_registered_model_tag(name, PROMOTION_METRIC_TAG, promotion.metric)
    client.set_registered_model_tag(name, PROMOTION_MODE_TAG, promotion.mode)


def declared_promotion(name: str) -> Promotion | None:
    """The promotion metric and mode that the trainer of `name` stored, or None (older registrations)."""
    client = MlflowClient()
    require_model(name, client)
    tags = client.get_registered_model(name).tags
    if PROMOTION_METRIC_TAG not in tags:
        return None
    return Promotion(name, tags[PROMOTION_METRIC_TAG], tags.get(PROMOTION_MODE_TAG, "min"))


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


def competing_versions(name: str, metric: str, data_digest: str | None = None) -> list[CandidateVersion]:
    """`candidate_versions`, never empty: RegistryError saying why (no version has the metric, or none was
    trained on table `data_digest`, naming the tables that do have it)."""
    candidates = candidate_versions(name, metric, data_digest)
    if candidates:
        return candidates
    if data_digest is not None and (tables := sorted({c.data_digest or "(untagged)" for c in candidate_versions(name, metric)})):
        raise RegistryError(f"no version of {name!r} was trained on table {data_digest!r} "
                            f"(versions with {metric!r} were trained on: {', '.join(tables)})")
    raise RegistryError(f"no version of {name!r} has a logged metric {metric!r}")


def newest_data_digest(name: str, metric: str) -> str:
    """The table (data_digest tag) of the newest version of `name` that logged `metric`."""
    return competing_versions(name, metric)[-1].data_digest


@dataclass(frozen=True)
class PromotionResult:
    version: str
    value: float
    previous_champion: str | None
    previous_value: float | None
    changed: bool
    excluded: tuple[tuple[str, str], ...] = ()  # (version, why) of the versions a requirement ruled out


_OPERATORS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, ">": operator.gt, "<": operator.lt}
_REQUIREMENT = re.compile(r"^\s*([A-Za-z_][\w.\-/]*)\s*(>=|<=|==|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Requirement:
    """A constraint a version's source-run metric must meet to become champion, e.g. test_adherence_min>=0.97."""

    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def violation(self, metrics: dict[str, float]) -> str | None:
        """Why `metrics` (a run's) fail the requirement, or None when they meet it."""
        if self.metric not in metrics:
            return f"no {self.metric}"
        if not _OPERATORS[self.op](metrics[self.metric], self.value):
            return f"{self.metric}={metrics[self.metric]:.6g} fails {self}"
        return None


def parse_requirement(text: str) -> Requirement:
    """`<metric><op><number>` with op one of >=, <=, >, <, == -> Requirement; RegistryError (one line) otherwise."""
    match = _REQUIREMENT.match(str(text))
    if match is None:
        raise RegistryError(f"require={text!r} is not <metric><op><number> with op one of >=, <=, >, <, == "
                            "(e.g. test_adherence_min>=0.97)")
    return Requirement(match.group(1), match.group(2), float(match.group(3)))


def excluded_by(candidates: Sequence[CandidateVersion], requirements: Sequence[Requirement]) -> dict[str, str]:
    """{version: why} for the candidates whose source run fails one of `requirements`."""
    if not requirements:
        return {}
    client, out = MlflowClient(), {}
    for candidate in candidates:
        metrics = client.get_run(candidate.run_id).data.metrics
        reasons = [why for r in requirements if (why := r.violation(metrics)) is not None]
        if reasons:
            out[candidate.version] = "; ".join(reasons)
    return out


def promote(
    name: str, metric: str, mode: str = "min", alias: str = "champion", version: str | None = None, force: bool = False,
    data_digest: str | None = None, require: Sequence[Requirement] = (),
) -> PromotionResult:
    """Move `alias` to the best version by `metric` (or to `version`), among the versions trained on
    table `data_digest` when given (held-out figures of different tables do not compare) whose source
    runs meet every `require` (the others never become champion; the result lists them and why).

    Refuses (RegistryError) to replace a champion whose metric is better, unless `force`; a
    champion trained on another table than `data_digest`, or failing a requirement, is not a rival.
    """
    if mode not in ("min", "max"):
        raise RegistryError(f"mode must be 'min' or 'max', got {mode!r}")
    candidates = competing_versions(name, metric, data_digest)
    excluded = excluded_by(candidates, require)
    if version in excluded:
        raise RegistryError(f"version {version} of {name!r} fails the requirement: {excluded[version]}")
    if len(excluded) == len(candidates):
        raise RegistryError(f"no version of {name!r} meets {', '.join(map(str, require))}: "
                            + ", ".join(f"version {v} ({why})" for v, why in excluded.items()))
    candidates = [c for c in candidates if c.version not in excluded]
    better = (lambda a, b: a < b) if mode == "min" else (lambda a, b: a > b)
    by_version = {c.version: c for c in candidates}
    if version:
        if version not in by_version:
            scope = f" (among versions trained on table {data_digest})" if data_digest is not None else ""
            raise RegistryError(f"version {version} of {name!r} does not exist or lacks metric {metric!r}{scope}")
        chosen = by_version[version]
    else:
        chosen = min(candidates, key=lambda c: c.value if mode == "min" else -c.value)
    ruled_out = tuple(excluded.items())

    client = MlflowClient()
    try:
        current = client.get_model_version_by_alias(name, alias)
        current_version: str | None = str(current.version)
    except MlflowException:
        current_version = None
    current_value = by_version[current_version].value if current_version in by_version else None

    if current_version == chosen.version:
        return PromotionResult(chosen.version, chosen.value, current_version, current_value, False, ruled_out)
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
    return PromotionResult(chosen.version, chosen.value, current_version, current_value, True, ruled_out)


def promote_if_better(name: str, version: str, promotion: Promotion) -> str:
    """Offer a freshly registered `version` for champion by `promotion`'s metric -> a one-line outcome
    ('champion -> N', or 'champion kept (why)'); a worse version is registered, never promoted."""
    try:
        result = promote(name, promotion.metric, promotion.mode, version=version)
        return f"registered {name} version {version}, champion -> {result.version}"
    except RegistryError as refused:
        return f"registered {name} version {version}; champion kept ({refused})"
