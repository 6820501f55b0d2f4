"""Training loop behaviour: early stopping restores the best weights, checkpoints resume,
predictions come back in original units, and the saved forecaster reproduces them."""

from __future__ import annotations

import pickle

import numpy as np
import pandas as pd
import pytest
import torch

from core.forecasting.windows import ForecastDataError, build_datasets
from core.forecasting.metrics import error_by_load_level
from core.forecasting.plots import plot_error_by_load_level, plot_forecast_vs_actual, plot_loss_curves
from core.forecasting.training import (
    EpochRecord,
    ForecastTrainConfig,
    Forecaster,
    TrainingDivergedError,
    _evaluate,
    model_inputs,
    predict,
    train_forecaster,
)

torch.set_num_threads(1)
CHANNELS = ("requests", "tokens")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    minute = np.arange(3000)
    level = 20 + 10 * np.sin(2 * np.pi * minute / 200)
    series = np.stack([rng.poisson(level), 100 * level + rng.normal(0, 50, 3000)], axis=1).astype(float)
    return build_datasets(series, seq_len=32, horizon=3, stride=1, train_frac=0.6, val_frac=0.2,
                          channels=CHANNELS)


def _config(**overrides) -> ForecastTrainConfig:
    base = dict(model_kind="dlinear", seq_len=32, horizon=3, kernel_size=5, batch_size=64, num_epochs=4, patience=10)
    return ForecastTrainConfig(**{**base, **overrides})


def _val_loss(model, data) -> float:
    return _evaluate(model, torch.from_numpy(data.X_val), torch.from_numpy(data.Y_val))[0]


def test_training_learns_and_records_every_epoch(data):
    seen: list[EpochRecord] = []
    result = train_forecaster(data, _config(), on_epoch=seen.append)
    assert [r.epoch for r in result.history] == [1, 2, 3, 4] and seen == result.history
    assert result.best_val_loss < 0.5  # the sine level is learnable; a constant predictor scores ~1
    assert result.resumed_from_epoch == 0 and not result.stopped_early


def test_early_stopping_restores_the_best_weights_not_the_last(data):
    # A far too high learning rate makes val loss jump around, so later epochs are worse.
    result = train_forecaster(data, _config(lr=0.5, num_epochs=30, patience=3))
    assert result.stopped_early
    last = result.history[-1]
    assert not last.is_best and result.best_epoch < last.epoch
    assert _val_loss(result.model, data) == pytest.approx(result.best_val_loss, rel=1e-5)
    assert abs(last.val_loss - result.best_val_loss) > 1e-3


def test_callback_exceptions_propagate(data):
    class Prune(Exception):
        pass

    def on_epoch(record: EpochRecord) -> None:
        if record.epoch == 2:
            raise Prune

    with pytest.raises(Prune):
        train_forecaster(data, _config(), on_epoch=on_epoch)


def test_checkpoint_resume_continues_from_the_saved_epoch(data, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    first = train_forecaster(data, _config(num_epochs=2), checkpoint_path=checkpoint)
    assert checkpoint.exists() and len(first.history) == 2
    seen: list[int] = []
    resumed = train_forecaster(data, _config(num_epochs=4), checkpoint_path=checkpoint,
                            on_epoch=lambda r: seen.append(r.epoch))
    assert resumed.resumed_from_epoch == 2 and seen == [3, 4]
    assert [r.epoch for r in resumed.history] == [1, 2, 3, 4]
    # Shuffling state travels with the checkpoint: the same run as one without interruption.
    straight = train_forecaster(data, _config(num_epochs=4))
    np.testing.assert_allclose([r.val_loss for r in resumed.history],
                               [r.val_loss for r in straight.history], rtol=1e-6)


def test_resuming_a_run_that_stopped_early_trains_no_more(data, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    first = train_forecaster(data, _config(lr=0.5, num_epochs=30, patience=2), checkpoint_path=checkpoint)
    assert first.stopped_early
    seen: list[EpochRecord] = []
    again = train_forecaster(data, _config(lr=0.5, num_epochs=30, patience=2), checkpoint_path=checkpoint,
                          on_epoch=seen.append)
    assert seen == [] and again.stopped_early and again.history == first.history
    assert again.resumed_from_epoch == first.history[-1].epoch
    assert _val_loss(again.model, data) == pytest.approx(first.best_val_loss, rel=1e-5)


def test_config_must_match_the_windows(data):
    with pytest.raises(ForecastDataError, match="seq_len/horizon"):
        train_forecaster(data, _config(seq_len=64))


def test_predict_returns_original_units(data):
    result = train_forecaster(data, _config(num_epochs=2))
    forecast = predict(result.model, data.X_test, data.scaler)
    _, Y_test = data.unscaled("test")
    assert forecast.shape == Y_test.shape
    with torch.no_grad():
        scaled = result.model(torch.from_numpy(data.X_test)).numpy()
    np.testing.assert_allclose(forecast, scaled * data.scaler.std + data.scaler.mean, rtol=1e-5)
    assert abs(forecast[..., 1].mean() - Y_test[..., 1].mean()) < 0.2 * Y_test[..., 1].mean()


def test_forecaster_forecasts_saves_loads_and_pickles(data, tmp_path):
    result = train_forecaster(data, _config(num_epochs=2))
    forecaster = Forecaster.from_training(result, data)
    X_test, _ = data.unscaled("test")
    history = pd.DataFrame(np.vstack([np.zeros((5, 2)), X_test[0]]), columns=list(CHANNELS))
    out = forecaster.forecast(history)  # uses the last seq_len rows
    assert out.index.tolist() == [1, 2, 3] and list(out.columns) == list(CHANNELS)
    expected = predict(result.model, data.X_test[:1], data.scaler)[0]
    np.testing.assert_allclose(out.to_numpy(), expected, rtol=1e-4)
    loaded = Forecaster.load(forecaster.save(tmp_path / "forecaster"))
    pd.testing.assert_frame_equal(loaded.forecast(history), out)
    pd.testing.assert_frame_equal(pickle.loads(pickle.dumps(forecaster)).forecast(history), out)


def test_forecaster_rejects_bad_history(data):
    forecaster = Forecaster.from_training(train_forecaster(data, _config(num_epochs=1)), data)
    with pytest.raises(ForecastDataError, match="needs at least 32 .*seq_len = 32"):
        forecaster.forecast(pd.DataFrame(np.ones((10, 2)), columns=list(CHANNELS)))
    with pytest.raises(ForecastDataError, match=r"missing column\(s\) \['tokens'\]"):
        forecaster.forecast(pd.DataFrame({"requests": np.ones(40)}))


def test_plots_build_figures_and_save(data, tmp_path):
    result = train_forecaster(data, _config(num_epochs=2))
    _, Y = data.unscaled("test")
    pred = predict(result.model, data.X_test, data.scaler)
    fig = plot_loss_curves(result.history, path=tmp_path / "loss.png")
    assert (tmp_path / "loss.png").stat().st_size > 0 and len(fig.axes) == 1
    assert len(plot_forecast_vs_actual(Y, pred, CHANNELS, t0=data.t0_test, num_minutes=200).axes) == 2
    table = error_by_load_level(Y, pred, CHANNELS)
    assert len(plot_error_by_load_level(table).axes) == 2


# --- the calendar MLP, divergence, threads and checkpoints on other data --------------------------------

def test_calendar_mlp_learns_quantiles_and_its_forecaster_needs_the_clock(data, tmp_path):
    result = train_forecaster(data, _config(model_kind="calendar_mlp", num_epochs=20, recent_minutes=8))
    forecast = predict(result.model, model_inputs(result.config, data, "test"), data.scaler)
    _, Y_test = data.unscaled("test")
    assert forecast.shape == (*Y_test.shape, 2) and (forecast >= 0).all()
    assert (forecast[..., 1] >= forecast[..., 0]).mean() > 0.95  # P90 above P50
    assert 0.75 < (Y_test <= forecast[..., 1]).mean() < 0.99
    forecaster = Forecaster.load(Forecaster.from_training(result, data).save(tmp_path / "f"))
    t0 = int(data.t0_test[0])  # the model reads 60 minutes back (its longest recent mean)
    history = pd.DataFrame(np.asarray(data.split.full)[t0 - 60:t0], columns=list(CHANNELS)).assign(minute=np.arange(t0 - 60, t0))
    out = forecaster.forecast(history)
    np.testing.assert_allclose(out[list(CHANNELS)].to_numpy(), forecast[0, ..., 0], rtol=1e-4)
    np.testing.assert_allclose(out["requests_p90"].to_numpy(), forecast[0, :, 0, 1], rtol=1e-4)
    with pytest.raises(ForecastDataError, match=r"missing column\(s\) \['minute'\]"):
        forecaster.forecast(history.drop(columns="minute"))


def test_non_finite_loss_stops_training_naming_epoch_and_lr(data, tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"diverged at epoch 1: .* \(lr=1e\+30\)"):
        train_forecaster(data, _config(lr=1e30), checkpoint_path=tmp_path / "ckpt.pt")
    assert not (tmp_path / "ckpt.pt").exists()
    with pytest.raises(ForecastDataError, match="lr must be a finite number"):
        train_forecaster(data, _config(lr=float("inf")))


def test_explicit_num_threads_wins_over_the_environment(data):
    torch.set_num_threads(2)  # what OMP_NUM_THREADS=2 leaves
    train_forecaster(data, _config(num_epochs=1, num_threads=1))
    assert torch.get_num_threads() == 1


def test_checkpoint_of_other_data_is_refused(data, tmp_path):
    checkpoint = tmp_path / "ckpt.pt"
    train_forecaster(data, _config(num_epochs=1), checkpoint_path=checkpoint)
    series = np.asarray(data.split.full) * 2
    other = build_datasets(series, seq_len=32, horizon=3, stride=1, train_frac=0.6, val_frac=0.2, channels=CHANNELS)
    with pytest.raises(ForecastDataError, match="written for other data"):
        train_forecaster(other, _config(num_epochs=2), checkpoint_path=checkpoint)
    assert _config().checkpoint_name(data.digest()) != _config().checkpoint_name(other.digest())
    assert _config(lr=0.1).checkpoint_name(data.digest()) != _config().checkpoint_name(data.digest())
    assert _config(num_epochs=9).checkpoint_name(data.digest()) == _config().checkpoint_name(data.digest())
