"""The study a `train_estimator` run performs: the MLP trained on the by-sample split (unseen samples)
and on the held-out-config split (an unseen knob value), each scored on its test rows against the
baselines fitted on the same training samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core.latency.data import EstimatorSplit, TrainingData
from core.latency.estimator import (
    RESUME_STATE, EstimatorConfig, LatencyEstimator, best_epoch_metrics, resume_state, split_digest, train_estimator,
)
from core.latency.evaluation import Evaluation, score_split
from core.latency.metrics import run_to_run_noise

HELDOUT_SUBDIR = "heldout_config"  # the held-out-config model's checkpoints, under the run's checkpoint directory


@dataclass
class FittedSplit:
    """One model trained on one split, and its scores (with the baselines') on that split's test rows."""

    prefix: str  # of its metrics: "test_" (by sample) or "heldout_config_"
    model: LatencyEstimator
    history: list[dict]
    scores: Evaluation
    checkpoint_dir: Path


def fit_split(split: EstimatorSplit, prefix: str, config: EstimatorConfig, checkpoint_dir: Path, resume: bool = False,
              on_epoch: Callable[[dict], None] | None = None) -> FittedSplit:
    """`train_estimator` on the split's train/val rows (checkpoints in `checkpoint_dir`), then `score_split`."""
    model, history = train_estimator(split.train, split.val, config, on_epoch=on_epoch, checkpoint_dir=checkpoint_dir,
                                     resume=resume)
    return FittedSplit(prefix, model, history, score_split(model, split, config.quantile, prefix), checkpoint_dir)


@dataclass
class StudyOutcome:
    by_sample: FittedSplit
    heldout: FittedSplit | None
    metrics: dict[str, float]  # the run's final metrics (see `run_study`)

    @property
    def fits(self) -> list[FittedSplit]:
        return [f for f in (self.by_sample, self.heldout) if f is not None]


def run_study(data: TrainingData, config: EstimatorConfig, checkpoint_dir: Path, resume: bool = False,
              on_epoch: Callable[[dict], None] | None = None) -> StudyOutcome:
    """Both fits (`on_epoch` sees the by-sample model's epochs). Metrics: best_epoch, best_val_loss and
    best_val_rel_error_mean of the by-sample model, its test_ and the baselines' baseline_<name>_test_
    scores, the test rows' run-to-run noise (test_noise_*), and the same scores of the held-out-config
    model under heldout_config_."""
    by_sample = fit_split(data.split, "test_", config, checkpoint_dir, resume, on_epoch)
    metrics = {**best_epoch_metrics(by_sample.model, by_sample.history), **by_sample.scores.metrics,
               **{f"test_{k}": v for k, v in run_to_run_noise(data.split.test).items()}}
    heldout = None
    if data.heldout is not None:
        heldout = fit_split(data.heldout, "heldout_config_", config, Path(checkpoint_dir) / HELDOUT_SUBDIR, resume)
        metrics.update(heldout.scores.metrics)
    return StudyOutcome(by_sample, heldout, metrics)


def check_resume(data: TrainingData, config: EstimatorConfig, checkpoint_dir: str | Path) -> None:
    """Before a resumed study starts (nothing to check for checkpoint_dir ''): `checkpoint_dir` holds a training
    state for these parameters and these splits' rows (its held-out-config model's too); FileNotFoundError /
    EstimatorError naming the file otherwise."""
    if not checkpoint_dir:
        return
    if not (Path(checkpoint_dir) / RESUME_STATE).is_file():
        raise FileNotFoundError(f"resume_dir {checkpoint_dir} holds no {RESUME_STATE} to resume from")
    for split, where in ((data.split, ""), (data.heldout, HELDOUT_SUBDIR)):
        if split is not None:
            resume_state(Path(checkpoint_dir) / where, config, split_digest(split.train, split.val))
