"""Latency estimator: splits, scalers, learning a known latency law, best-weight restore,
checkpoints, input errors and the prediction interface.

The profiling tables come from `tests.helpers.synthetic_profile` (a known law plus multiplicative
noise), which the baseline tests, the entry-point fixtures and the benchmark share.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch

from core.latency.baselines import LinearBaseline
from core.latency.data import (
    EstimatorError,
    knob_value,
    load_profile_table,
    prepare_table,
    split_by_sample,
    split_heldout_config,
    split_record,
)
from core.latency.estimator import EstimatorConfig, LatencyEstimator, best_epoch_metrics, epoch_lr, train_estimator
from core.latency.evaluation import evaluate_predictor, predict_groups
from core.latency.features import FEATURES, OUTPUT_COLUMNS, feature_matrix, knob_levels
from tests.helpers import synthetic_profile

torch.set_num_threads(1)

FAST = EstimatorConfig(num_epochs=20, lr=2e-3, seed=0)


@pytest.fixture(scope="module")
def table() -> pd.DataFrame:
    return synthetic_profile(num_samples=30, num_runs=2, seed=0)


@pytest.fixture(scope="module")
def trained(table: pd.DataFrame):
    split = split_by_sample(table, 0.8, seed=0)
    calls: list[dict] = []
    model, history = train_estimator(split.train, split.val, FAST, on_epoch=calls.append)
    return split, model, history, calls


# --- splits --------------------------------------------------------------------------------------
def test_split_by_sample_puts_every_sample_in_exactly_one_split(table):
    split = split_by_sample(table, train_fraction=0.8, seed=3)
    train, val, test = split
    ids = [set(part["sample_id"]) for part in (train, val, test)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert ids[0] | ids[1] | ids[2] == set(table["sample_id"])
    assert len(train) + len(val) + len(test) == len(table)
    sizes = split.as_params()
    assert (sizes["train_samples"], sizes["val_samples"], sizes["test_samples"]) == (19, 5, 6)
    assert sizes["split"] == "by_sample" and sizes["heldout_value"] is None


def test_split_by_sample_needs_three_samples(table):
    two = table[table["sample_id"].isin(["synthetic:test:0", "synthetic:test:1"])]
    with pytest.raises(EstimatorError, match="sample_id"):
        split_by_sample(two)


def test_heldout_config_split_never_trains_on_the_heldout_value(table):
    split = split_heldout_config(table, knob="top_k")
    assert split.heldout_value == 8  # middle of MolmoE's 4, 6, 8, 10, 12
    assert 8 not in set(split.train["top_k"]) | set(split.val["top_k"])
    assert set(split.test["top_k"]) == {8}
    assert not set(split.train["sample_id"]) & set(split.val["sample_id"])
    assert len(split.train) + len(split.val) + len(split.test) == len(table)
    assert split.as_params()["heldout_knob"] == "top_k" and split.as_params()["heldout_value"] == 8


def test_heldout_config_rejects_a_value_outside_the_knob_space(table):
    with pytest.raises(EstimatorError, match="top_k=7"):
        split_heldout_config(table, knob="top_k", value=7)
    assert knob_value("top_k", "8", "heldout_value") == 8 and knob_value("tier", "low") == "low"
    assert knob_value("top_k", "") is None
    with pytest.raises(EstimatorError, match="heldout_value='eight'"):
        knob_value("top_k", "eight", "heldout_value")


def test_split_record_names_every_sample_of_both_splits_as_json(table):
    by_sample, heldout = split_by_sample(table, seed=1), split_heldout_config(table, value=np.int64(8))
    record = json.loads(json.dumps(split_record(by_sample, heldout)))  # JSON-able: a numpy value became a plain one
    assert sorted(sum(record["by_sample"].values(), [])) == sorted(set(table["sample_id"]))
    assert set(record["by_sample"]["test"]) == set(by_sample.test["sample_id"])
    assert record["heldout_config"]["knob"] == "top_k" and record["heldout_config"]["value"] == 8
    assert set(record["heldout_config"]["val"]) == set(heldout.val["sample_id"])
    assert "heldout_config" not in split_record(by_sample)


# --- training --------------------------------------------------------------------------------------
def test_scalers_are_fitted_on_training_rows_only(trained, table):
    split, model, _, _ = trained
    train_mean = feature_matrix(split.train, model.levels).astype(np.float64).mean(axis=0)
    all_mean = feature_matrix(table, model.levels).astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(model.feature_mean.numpy(), train_mean, rtol=1e-5)
    text = FEATURES.index("text_tokens")
    assert abs(all_mean[text] - train_mean[text]) > 1e-3 * train_mean[text]  # the check can tell them apart
    log_prefill = np.log(split.train["T_prefill_ms"]).mean()
    assert model.target_log_mean[1].item() == pytest.approx(log_prefill, rel=1e-5)


def test_step_ramps_follow_the_training_values_of_each_knob(table):
    split = split_heldout_config(table, knob="top_k")  # top_k 8 never in training
    model, _ = train_estimator(split.train, split.val, replace(FAST, num_epochs=1))
    np.testing.assert_array_equal(model.levels, [[4, 6, 10, 12, np.inf], [8, 10, 12, 14, 16]])
    steps = [FEATURES.index(f"top_k_step_{j}") for j in range(1, 5)]
    rows = split.test.head(1)
    features = lambda **knobs: feature_matrix(rows.assign(**knobs), model.levels)[0, steps].tolist()  # noqa: E731
    assert features(top_k=4) == [0, 0, 0, 0] and features(top_k=10) == [1, 1, 0, 0] and features(top_k=12) == [1, 1, 1, 0]
    assert features(top_k=8) == [1, 0.5, 0, 0]  # the unseen value lies half-way up the 6 -> 10 step
    assert np.isinf(model.feature_std[steps[3]].item())  # a ramp never on in training is a constant
    assert knob_levels(np.array([[0, 0, 0, 0, k, 8] for k in range(1, 11)], dtype=float))[0].tolist() == [1, 2, 5, 7, 10]
    tiers = [FEATURES.index("tier_step_1"), FEATURES.index("tier_step_2")]
    assert feature_matrix(rows.assign(tier="high"), model.levels)[0, tiers].tolist() == [1, 1]


def test_a_feature_constant_in_training_is_ignored_at_prediction():
    table = synthetic_profile(num_samples=4, num_runs=1, seed=9).assign(text_tokens=16)
    train, val, _ = split_by_sample(table)
    model, _ = train_estimator(train, val, replace(FAST, num_epochs=1))
    assert np.isinf(model.feature_std[FEATURES.index("text_tokens")].item())
    # whatever text length comes later, that input reads 0 (the training mean) in standardised units
    standardised = model.standardise(model.features(val.assign(text_tokens=1000)))
    assert (standardised[:, FEATURES.index("text_tokens")] == 0).all()
    assert torch.isfinite(standardised).all()


def test_mlp_learns_the_synthetic_law_and_beats_the_linear_baseline(trained):
    split, model, _, _ = trained
    assert (split.test["output_tokens"] == 1).any() or (split.train["output_tokens"] == 1).any()  # masked rows exist
    mlp = evaluate_predictor(model, split.test, "test_")
    linear = evaluate_predictor(LinearBaseline().fit(split.train), split.test, "baseline_linear_test_")
    assert mlp["test_mape_prefill"] < 3.0
    assert mlp["test_mape_decode"] < 5.0
    assert mlp["test_within10"] >= 0.97
    assert mlp["test_mape_prefill"] < linear["baseline_linear_test_mape_prefill"]
    assert mlp["test_mape_total"] < linear["baseline_linear_test_mape_total"]


def test_history_has_the_per_epoch_metric_names_and_feeds_the_callback(trained):
    _, model, history, calls = trained
    assert len(history) == FAST.num_epochs and calls == history
    for name in ("train_loss", "val_loss", "train_mae_prefill", "train_mae_decode", "train_rel_error_prefill",
                 "train_rel_error_decode", "val_mae_prefill", "val_mae_decode", "val_rel_error_prefill",
                 "val_rel_error_decode", "val_rel_error_mean"):
        assert np.isfinite([r[name] for r in history]).all(), name
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    assert model.meta["best_epoch"] == 1 + int(np.argmin([r["val_loss"] for r in history]))
    # the tuning objective: the mean relative error over the three predicted components
    last = history[-1]
    assert last["val_rel_error_mean"] == pytest.approx(
        np.mean([last[f"val_rel_error_{c}"] for c in ("vision", "prefill", "decode")]))
    best = best_epoch_metrics(model, history)
    assert best["best_epoch"] == model.meta["best_epoch"]
    assert best["best_val_loss"] == min(r["val_loss"] for r in history)


def test_cosine_schedule_anneals_the_learning_rate_each_epoch(trained):
    _, _, history, _ = trained
    lrs = [r["lr"] for r in history]
    assert lrs[0] == pytest.approx(FAST.lr) and lrs[-1] == pytest.approx(FAST.lr / 100)
    assert all(a > b for a, b in zip(lrs, lrs[1:]))
    assert lrs == pytest.approx([epoch_lr(FAST, e) for e in range(1, FAST.num_epochs + 1)])
    assert epoch_lr(replace(FAST, lr_schedule="constant"), 7) == FAST.lr
    with pytest.raises(EstimatorError, match="parameter lr_schedule must be one of"):
        replace(FAST, lr_schedule="step").validate()


def test_training_restores_the_best_val_loss_weights_and_checkpoints(tmp_path):
    table = synthetic_profile(num_samples=8, num_runs=1, seed=1)
    train, val, _ = split_by_sample(table, 0.8, seed=0)
    # A constant learning rate this high makes val loss jump around, so the last epoch is not the best.
    config = replace(FAST, num_epochs=10, lr=0.03, lr_schedule="constant", loss="log_mse")
    model, history = train_estimator(train, val, config, checkpoint_dir=tmp_path)
    losses = [r["val_loss"] for r in history]
    best_epoch = 1 + int(np.argmin(losses))
    assert best_epoch != len(history), "precondition: the last epoch must not be the best"
    best, last = LatencyEstimator.load(tmp_path / "best.pt"), LatencyEstimator.load(tmp_path / "epoch_010.pt")
    assert best.meta["epoch"] == best_epoch
    assert best.meta["val_loss"] == pytest.approx(min(losses))
    pd.testing.assert_frame_equal(model.predict_frame(val), best.predict_frame(val))
    assert not np.allclose(model.predict_frame(val).to_numpy(), last.predict_frame(val).to_numpy())


def test_resume_continues_where_the_checkpoint_stopped(tmp_path):
    table = synthetic_profile(num_samples=6, num_runs=1, seed=2)
    train, val, _ = split_by_sample(table, 0.8, seed=0)
    config = replace(FAST, num_epochs=4)
    _, straight = train_estimator(train, val, config)

    class Interrupted(Exception):
        pass

    def stop_after_epoch_2(record: dict) -> None:
        if record["epoch"] == 2:
            raise Interrupted  # the process dies after epoch 2's checkpoint was written

    with pytest.raises(Interrupted):
        train_estimator(train, val, config, on_epoch=stop_after_epoch_2, checkpoint_dir=tmp_path)
    _, resumed = train_estimator(train, val, config, checkpoint_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in resumed] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["val_loss"] for r in resumed], [r["val_loss"] for r in straight], rtol=1e-5)
    with pytest.raises(EstimatorError, match="hidden_width"):
        train_estimator(train, val, replace(config, hidden_width=32), checkpoint_dir=tmp_path, resume=True)


# --- persistence -----------------------------------------------------------------------------------
def test_save_load_round_trip_gives_identical_predictions(trained, tmp_path):
    split, model, _, _ = trained
    path = model.save(tmp_path / "estimator.pt")
    loaded = LatencyEstimator.load(path)
    pd.testing.assert_frame_equal(model.predict_frame(split.test), loaded.predict_frame(split.test))
    assert loaded.meta["best_epoch"] == model.meta["best_epoch"]
    assert loaded.config == model.config


def test_a_wrong_shape_checkpoint_raises_naming_the_file(trained, tmp_path):
    _, model, _, _ = trained
    saved = model.checkpoint()
    saved["config"]["hidden_width"] = 64
    torch.save(saved, tmp_path / "narrow.pt")
    with pytest.raises(EstimatorError, match=r"narrow\.pt.*hidden_width=64"):
        LatencyEstimator.load(tmp_path / "narrow.pt")
    saved = model.checkpoint()
    saved["features"] = saved["features"][:-1]
    torch.save(saved, tmp_path / "fewer_features.pt")
    with pytest.raises(EstimatorError, match=r"fewer_features\.pt.*features"):
        LatencyEstimator.load(tmp_path / "fewer_features.pt")
    with pytest.raises(EstimatorError, match=r"missing\.pt"):
        LatencyEstimator.load(tmp_path / "missing.pt")


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("T_prefill_ms", np.nan), ("T_vision_ms", -1.0)])
def test_nan_or_negative_latency_raises_naming_the_field(field, value):
    table = synthetic_profile(num_samples=4, num_runs=1, seed=3)
    train, val, _ = split_by_sample(table)
    train = train.copy()
    train.loc[5, field] = value
    with pytest.raises(EstimatorError, match=field):
        train_estimator(train, val, replace(FAST, num_epochs=1))


def test_empty_table_and_unknown_data_set_raise(table, tmp_path):
    with pytest.raises(EstimatorError, match="empty"):
        prepare_table(table.iloc[:0], "train_df")
    with pytest.raises(EstimatorError, match=r"dataset.*nope"):
        prepare_table(table, dataset_names=["nope"])
    with pytest.raises(EstimatorError, match="does not exist"):
        load_profile_table(tmp_path / "no_results")
    with pytest.raises(EstimatorError, match="parameter loss"):
        EstimatorConfig(loss="huber").validate()


# --- prediction interface --------------------------------------------------------------------------
def test_predict_frame_columns_totals_and_fast_paths_agree(trained):
    split, model, _, _ = trained
    rows = split.test.iloc[:300]  # > 256 rows: the torch path
    pred = model.predict_frame(rows)
    assert list(pred.columns) == list(OUTPUT_COLUMNS) + ["T_total_ms", "T_total_ms_p90"]
    assert pred.index.equals(rows.index)
    steps = np.maximum(rows["output_tokens"] - 1, 0)
    np.testing.assert_allclose(pred["T_total_ms"],
                               pred["T_vision_ms"] + pred["T_prefill_ms"] + steps * pred["T_decode_per_token_ms"])
    for column in ("T_vision_ms", "T_prefill_ms", "T_decode_per_token_ms", "T_total_ms"):
        assert (pred[f"{column}_p90"] >= pred[column]).all()
    small = model.predict_frame(rows.iloc[:10])  # the numpy path
    np.testing.assert_allclose(small.to_numpy(), pred.iloc[:10].to_numpy(), rtol=1e-5)
    r = rows.iloc[0]
    one = model.predict_one(r["tier"], r["top_k"], r["num_active_blocks"], r["vision_tokens"], r["text_tokens"],
                            r["crops"], output_tokens=r["output_tokens"])
    np.testing.assert_allclose([one[c] for c in pred.columns], pred.iloc[0].to_numpy(), rtol=1e-5)
    without_length = model.predict_frame(rows.drop(columns="output_tokens"))
    assert "T_total_ms" not in without_length


def test_plots_return_figures(trained, tmp_path):
    from core.latency.plots import plot_error_distribution, plot_errors_by_knob, plot_pred_vs_true, plot_training_curves

    split, model, history, _ = trained
    truth, pred = predict_groups(model, split.test)
    assert len(plot_pred_vs_true(truth, pred).axes) == 4
    assert len(plot_error_distribution(truth, pred).axes) == 4
    assert len(plot_errors_by_knob(truth, pred).axes) == 3 * 4
    plot_training_curves(history, path=tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
