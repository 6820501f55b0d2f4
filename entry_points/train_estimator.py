"""Entry point `train_estimator`: the latency estimator (MLP with a P90 head) on a profiling table,
split by sample and by held-out config, scored against linear and analytic baselines, registered as
`latency-estimator`."""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import mlflow
import pandas as pd

from core.latency import plots as estimator_plots
from core.latency.estimator import (
    RAW_COLUMNS,
    EstimatorConfig,
    EstimatorError,
    EstimatorSplit,
    LatencyEstimator,
    evaluate_predictor,
    load_profile_table,
    predict_groups,
    split_by_sample,
    split_heldout_config,
    train_estimator,
)
from core.latency.baselines import AnalyticBaseline, LinearBaseline
from core.latency.metrics import feature_floor, per_config_table, run_to_run_noise
from tracking.artifacts import frame_digest, log_csv, log_dataset_input, log_figure, log_json, log_text
from tracking.cli import exit_on_input_error, parse_params, params_as_dict
from tracking.epoch_logging import EpochLogger
from tracking.estimator_refs import CHECKPOINT, HELDOUT_CHECKPOINT, HISTORY, SPLIT_RECORD
from tracking.models import log_pyfunc_model
from tracking.pyfunc_models import LatencyEstimatorPyfunc
from tracking.run_context import entry_point_run, set_data_digest
from tracking.tuning import CategoricalParam, FloatParam, IntParam, Objective

MODEL_NAME = "latency-estimator"
BASELINES = {"linear": LinearBaseline, "analytic": AnalyticBaseline}
SHORTS = ("vision", "prefill", "decode")
# Promotion: mean held-out-sample MAPE over the three predicted components (lower is better).
PROMOTION_METRIC = "test_mape_mean"


@dataclass
class Params:
    """Train the latency estimator on a profiling table (a ProfileStore results directory)."""

    results_dir: str = "data/profiles/h200-molmoe-arch-graph"
    dataset_names: str = ""  # comma-separated; empty = every data set in results_dir
    output_dir: str = "outputs/estimator"  # checkpoints go to <output_dir>/<run id>/
    batch_size: int = 64
    num_epochs: int = 50
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # cosine (lr -> lr/100 over the epochs) | constant
    train_split: float = 0.8  # share of samples for train + val; the rest is the held-out test set
    device: str = "cpu"
    seed: int = 0
    hidden_width: int = 128
    depth: int = 3
    weight_decay: float = 1e-5
    loss: str = "rel_l1"  # rel_l1 (mean |pred/true - 1|: MAPE itself) | log_mse | mse
    quantile: float = 0.9  # the upper-quantile head (guardrails read its P90)
    heldout_knob: str = "top_k"  # the held-out-config split never trains on one value of this knob
    heldout_value: str = ""  # empty: the middle option of the knob
    heldout_config: bool = True  # also train and score the held-out-config model
    resume_dir: str = ""  # continue from <resume_dir>/last.pt of an interrupted run (same parameters)
    output_tokens: int = 16  # the model's default answer length for T_total_ms when a row gives none
    profile_run_id: str = ""  # lineage: the profile run that wrote results_dir (the pipeline passes it)
    register: bool = True
    model_name: str = MODEL_NAME
    log_system_metrics: bool = False


SEARCH_SPACE = [
    CategoricalParam("hidden_width", (32, 64, 128, 256)),
    IntParam("depth", 1, 4),
    FloatParam("lr", 1e-4, 1e-2, log=True),
    FloatParam("weight_decay", 1e-7, 1e-3, log=True),
    CategoricalParam("loss", ("log_mse", "rel_l1", "mse")),
    CategoricalParam("lr_schedule", ("cosine", "constant")),
]
# Not val_loss: its scale depends on the loss kind, which the search varies.
OBJECTIVE = Objective(metric="val_rel_error_mean", direction="minimize")

TRAINING_COLUMNS = ("train_loss", "train_mae_prefill", "train_mae_decode", "train_rel_error_prefill",
                    "train_rel_error_decode", "train_mae_vision", "train_rel_error_vision", "lr", "epoch_time_s")
VALIDATION_COLUMNS = ("val_loss", "val_mae_prefill", "val_mae_decode", "val_rel_error_prefill", "val_rel_error_decode",
                      "val_mae_vision", "val_rel_error_vision", "val_rel_error_mean", "val_p90_coverage", "is_best")


def dataset_list(text: str) -> list[str] | None:
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def estimator_config(params: Params) -> EstimatorConfig:
    return EstimatorConfig(
        hidden_width=params.hidden_width, depth=params.depth, lr=params.lr, lr_schedule=params.lr_schedule,
        weight_decay=params.weight_decay,
        batch_size=params.batch_size, num_epochs=params.num_epochs, loss=params.loss, quantile=params.quantile,
        train_split=params.train_split, seed=params.seed, device=params.device,
    ).validate()


def _heldout_value(params: Params) -> object:
    """The -P heldout_value string as the knob's type (tier names stay strings)."""
    if not params.heldout_value:
        return None
    if params.heldout_knob == "tier":
        return params.heldout_value
    try:
        return int(params.heldout_value)
    except ValueError:
        raise EstimatorError(f"parameter heldout_value={params.heldout_value!r} is not an integer {params.heldout_knob}") from None


@dataclass
class PreparedData:
    table: pd.DataFrame
    split: EstimatorSplit
    heldout: EstimatorSplit | None


def prepare(params: Params) -> PreparedData:
    """Validate the parameters, load and check the table, make both splits: every input error surfaces here."""
    estimator_config(params)
    if params.output_tokens < 1:
        raise EstimatorError(f"parameter output_tokens must be >= 1, got {params.output_tokens}")
    if params.resume_dir and not (Path(params.resume_dir) / "last.pt").is_file():
        raise FileNotFoundError(f"resume_dir {params.resume_dir} holds no last.pt to resume from")
    table = load_profile_table(params.results_dir, dataset_list(params.dataset_names))
    split = split_by_sample(table, params.train_split, params.seed)
    heldout = (split_heldout_config(table, params.heldout_knob, _heldout_value(params), params.train_split, params.seed)
               if params.heldout_config else None)
    return PreparedData(table, split, heldout)


def _split_record(params: Params, prepared: PreparedData) -> dict:
    ids = lambda frame: sorted(frame["sample_id"].astype(str).unique().tolist())  # noqa: E731
    record: dict = {
        "results_dir": str(Path(params.results_dir).resolve()), "dataset_names": dataset_list(params.dataset_names),
        "seed": params.seed, "train_split": params.train_split,
        "by_sample": {name: ids(part) for name, part in zip(("train", "val", "test"), prepared.split)},
    }
    if prepared.heldout is not None:
        h = prepared.heldout
        value = h.heldout_value.item() if hasattr(h.heldout_value, "item") else h.heldout_value
        record["heldout_config"] = {"knob": h.heldout_knob, "value": value, "train": ids(h.train), "val": ids(h.val)}
    return record


def _log_split(params: Params, prepared: PreparedData) -> None:
    """Split sizes as params, sample ids as an artifact, each split as an MLflow dataset input."""
    split, source = prepared.split, str(Path(params.results_dir).resolve())
    mlflow.log_params({"split": split.kind, **{f"split_{k}": v for k, v in split.sizes().items()}})
    for context, part in zip(("training", "validation", "test"), split):
        log_dataset_input(part, name=f"profile-{context}", context=context, source=source)
    if prepared.heldout is not None:
        h = prepared.heldout
        mlflow.log_params({f"heldout_config_{k}": v for k, v in h.sizes().items()})
        mlflow.log_param("heldout_config_value", str(h.heldout_value.item() if hasattr(h.heldout_value, "item") else h.heldout_value))
        log_dataset_input(h.test, name=f"profile-heldout-{h.heldout_knob}-test", context="test", source=source)
    log_json(_split_record(params, prepared), SPLIT_RECORD)


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else float("nan")


def _train(split: EstimatorSplit, config: EstimatorConfig, checkpoint_dir: Path, resume: bool,
           on_record: Callable[[dict], None] | None) -> tuple[LatencyEstimator, list[dict]]:
    def on_epoch(record: dict) -> None:
        record["val_rel_error_mean"] = _mean([record[f"val_rel_error_{s}"] for s in SHORTS])
        if on_record is not None:
            on_record(record)

    return train_estimator(split.train, split.val, config, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir, resume=resume)


def _log_checkpoints(checkpoint_dir: Path, artifact_dir: str) -> None:
    """best.pt and every epoch_NNN.pt (last.pt, the optimizer state, stays local for resuming)."""
    for path in sorted(checkpoint_dir.glob("*.pt")):
        if path.name != "last.pt":
            mlflow.log_artifact(str(path), artifact_path=artifact_dir)


def _scores(predictor, split: EstimatorSplit, prefix: str) -> dict[str, float]:
    metrics = evaluate_predictor(predictor, split.test, prefix)
    metrics[f"{prefix}mape_mean"] = _mean([metrics[f"{prefix}mape_{s}"] for s in SHORTS])
    return metrics


def execute(
    params: Params,
    epoch_hook: Callable[[int, Mapping[str, float]], None] | None = None,
    prepared: PreparedData | None = None,
) -> dict[str, float]:
    """Train, score and log inside the active MLflow run; returns the final metrics."""
    prepared = prepared or prepare(params)
    config = estimator_config(params)
    run_id = mlflow.active_run().info.run_id
    set_data_digest(frame_digest(prepared.table))
    _log_split(params, prepared)

    logger = EpochLogger(TRAINING_COLUMNS, VALIDATION_COLUMNS)

    def on_record(record: dict) -> None:
        metrics = {k: float(v) for k, v in record.items() if k != "epoch"}
        logger.log(record["epoch"], metrics)
        if epoch_hook is not None:
            logger.flush()  # a pruned trial keeps the epochs it ran
            epoch_hook(record["epoch"], metrics)

    checkpoint_dir = Path(params.resume_dir) if params.resume_dir else Path(params.output_dir) / run_id
    try:
        model, history = _train(prepared.split, config, checkpoint_dir, bool(params.resume_dir), on_record)
    finally:
        logger.close()
    _log_checkpoints(checkpoint_dir, str(Path(CHECKPOINT).parent))
    log_json(history, HISTORY)
    log_figure(estimator_plots.plot_training_curves(history), "plots/training_curves.png")

    best = next(r for r in history if r["epoch"] == model.meta["best_epoch"]) if model.meta.get("best_epoch") else history[-1]
    # Final figures under names apart from the per-epoch ones: a step-0 point would spoil their curves.
    metrics: dict[str, float] = {"best_epoch": float(model.meta.get("best_epoch", 0)), "best_val_loss": float(best["val_loss"]),
                                 "best_val_rel_error_mean": float(best["val_rel_error_mean"])}
    metrics.update(_scores(model, prepared.split, "test_"))
    metrics.update({f"test_{k}": v for k, v in run_to_run_noise(prepared.split.test).items()})
    for name, baseline_cls in BASELINES.items():
        # Baselines have nothing to select on validation rows, so they fit on train + val: the
        # strongest version of each, on exactly the samples the MLP may learn from.
        fitted = baseline_cls(config.quantile).fit(pd.concat([prepared.split.train, prepared.split.val], ignore_index=True))
        metrics.update(_scores(fitted, prepared.split, f"baseline_{name}_test_"))
    truth, pred = predict_groups(model, prepared.split.test)
    metrics.update({f"test_{k}": v for k, v in feature_floor(truth).items()})
    log_csv(per_config_table(truth, pred), "evaluation/per_config_test.csv")
    log_csv(pd.concat([truth.reset_index(drop=True), pred.add_prefix("pred_").reset_index(drop=True)], axis=1),
            "evaluation/predictions_test.csv")

    if prepared.heldout is not None:
        heldout_dir = checkpoint_dir / "heldout_config"
        heldout_model, heldout_history = _train(prepared.heldout, config, heldout_dir, bool(params.resume_dir), None)
        _log_checkpoints(heldout_dir, str(Path(HELDOUT_CHECKPOINT).parent))
        log_json(heldout_history, "heldout_config/history.json")
        metrics.update(_scores(heldout_model, prepared.heldout, "heldout_config_"))
        for name, baseline_cls in BASELINES.items():
            fitted = baseline_cls(config.quantile).fit(pd.concat([prepared.heldout.train, prepared.heldout.val], ignore_index=True))
            metrics.update(_scores(fitted, prepared.heldout, f"baseline_{name}_heldout_config_"))
        truth, pred = predict_groups(heldout_model, prepared.heldout.test)
        log_csv(per_config_table(truth, pred), "evaluation/per_config_heldout_config.csv")

    mlflow.log_metrics({k: v for k, v in metrics.items() if math.isfinite(v)})
    metrics[OBJECTIVE.metric] = metrics["best_val_rel_error_mean"]  # the tuning objective, returned only
    log_json({"params": asdict(params), "train_config": asdict(config), "meta": model.meta}, "training_config.json")
    log_text(_report(params, prepared, metrics), "report.md")

    if params.register or epoch_hook is None:
        info = _log_model(model, prepared.split.test, params)
        if params.register:
            metrics["registered_version"] = float(info.registered_model_version)
    return metrics


def _log_model(model: LatencyEstimator, test: pd.DataFrame, params: Params):
    example = test[list(RAW_COLUMNS) + ["output_tokens"]].drop_duplicates().head(5).reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = model.save(Path(tmp) / f"{LatencyEstimatorPyfunc.CHECKPOINT_ARTIFACT}.pt")
        output = model.predict_frame(example).reset_index(drop=True)
        return log_pyfunc_model(
            "model", LatencyEstimatorPyfunc(), {LatencyEstimatorPyfunc.CHECKPOINT_ARTIFACT: str(path)}, example, output,
            registered_model_name=params.model_name if params.register else None,
            params={"output_tokens": params.output_tokens}, optional_inputs=("output_tokens",),
        )


def _report(params: Params, prepared: PreparedData, metrics: Mapping[str, float]) -> str:
    sizes = prepared.split.sizes()
    lines = [
        "# Latency estimator", "",
        f"Table `{params.results_dir}` ({len(prepared.table)} rows). Split by sample_id: "
        f"{sizes['train_samples']} train / {sizes['val_samples']} val / {sizes['test_samples']} test samples; "
        "errors against per-(sample, config) medians of the runs.", "",
        "| split | model | MAPE vision % | MAPE prefill % | MAPE decode % | MAPE total % | R² prefill | R² decode | within ±10% prefill | within ±10% decode |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for split_prefix, label in (("test_", "held-out samples"), ("heldout_config_", "held-out config")):
        for model_prefix, model_name in (("", "MLP"), *((f"baseline_{b}_", b) for b in BASELINES)):
            p = f"{model_prefix}{split_prefix}"
            if f"{p}mape_prefill" not in metrics:
                continue
            cell = lambda key, scale=1.0: f"{metrics.get(p + key, float('nan')) * scale:.3g}"  # noqa: E731
            lines.append(f"| {label} | {model_name} | {cell('mape_vision')} | {cell('mape_prefill')} | {cell('mape_decode')} | "
                         f"{cell('mape_total')} | {cell('r2_prefill')} | {cell('r2_decode')} | {cell('within10_prefill')} | "
                         f"{cell('within10_decode')} |")
    if "test_noise_mape_prefill" in metrics:
        lines += ["", "Run-to-run noise of the test rows (MAPE of one run against the median of the others): "
                  + ", ".join(f"{s} {metrics.get(f'test_noise_mape_{s}', float('nan')):.2f}%" for s in SHORTS)
                  + ". Errors against medians of n runs keep part of it."]
    lines += ["", f"Best epoch {int(metrics['best_epoch'])} of {params.num_epochs}; promotion metric "
              f"`{PROMOTION_METRIC}` = {metrics[PROMOTION_METRIC]:.3f}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    params = parse_params(Params, argv, prog="train_estimator")
    prepared = prepare(params)  # bad input fails here, before a run is opened
    with entry_point_run("train_estimator", params_as_dict(params), log_system_metrics=params.log_system_metrics) as run:
        metrics = execute(params, prepared=prepared)
    version = f", registered {params.model_name} version {int(metrics['registered_version'])}" if params.register else ""
    heldout = (f"; held-out {params.heldout_knob} MAPE prefill {metrics['heldout_config_mape_prefill']:.2f}%, "
               f"decode {metrics['heldout_config_mape_decode']:.2f}%" if "heldout_config_mape_prefill" in metrics else "")
    print(
        f"train_estimator: test MAPE prefill {metrics['test_mape_prefill']:.2f}%, decode {metrics['test_mape_decode']:.2f}%, "
        f"within10 prefill {metrics['test_within10_prefill']:.3f}, decode {metrics['test_within10_decode']:.3f} "
        f"(baselines prefill: " + ", ".join(f"{b} {metrics[f'baseline_{b}_test_mape_prefill']:.2f}%" for b in BASELINES)
        + f"){heldout}; run {run.info.run_id}{version}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(exit_on_input_error(main))
