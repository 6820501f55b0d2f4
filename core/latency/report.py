"""The latency estimator's reports: `report.md` (the MLP and every baseline on held-out samples and on
the held-out config, with the run-to-run noise that bounds what any estimator can reach) and the
one-line headline a training run prints."""

from __future__ import annotations

from typing import Mapping

from core.latency.baselines import BASELINES
from core.latency.data import EstimatorSplit
from core.timing import PREDICTED_COMPONENTS

_COLUMNS = (("mape_vision", "MAPE vision %"), ("mape_prefill", "MAPE prefill %"), ("mape_decode", "MAPE decode %"),
            ("mape_total", "MAPE total %"), ("r2_prefill", "R² prefill"), ("r2_decode", "R² decode"),
            ("within10_prefill", "within ±10% prefill"), ("within10_decode", "within ±10% decode"))
_SETS = (("test_", "held-out samples"), ("heldout_config_", "held-out config"))


def report_markdown(metrics: Mapping[str, float], results_dir: str, table_rows: int, split: EstimatorSplit,
                    num_epochs: int, promotion_metric: str) -> str:
    """Markdown of a training run's final `metrics` (train_estimator's names) on table `results_dir`."""
    sizes = split.sizes()
    lines = [
        "# Latency estimator", "",
        f"Table `{results_dir}` ({table_rows} rows). Split by sample_id: "
        f"{sizes['train_samples']} train / {sizes['val_samples']} val / {sizes['test_samples']} test samples; "
        "errors against per-(sample, config) medians of the runs.", "",
        "| split | model | " + " | ".join(label for _, label in _COLUMNS) + " |",
        "|---|---|" + "---|" * len(_COLUMNS),
    ]
    for set_prefix, label in _SETS:
        for model_prefix, model_name in (("", "MLP"), *((f"baseline_{b}_", b) for b in BASELINES)):
            p = f"{model_prefix}{set_prefix}"
            if f"{p}mape_prefill" not in metrics:
                continue
            cells = [f"{metrics.get(p + key, float('nan')):.3g}" for key, _ in _COLUMNS]
            lines.append(f"| {label} | {model_name} | " + " | ".join(cells) + " |")
    if "test_noise_mape_prefill" in metrics:
        lines += ["", "Run-to-run noise of the test rows (MAPE of one run against the median of the others): "
                  + ", ".join(f"{s} {metrics.get(f'test_noise_mape_{s}', float('nan')):.2f}%" for s in PREDICTED_COMPONENTS)
                  + ". Errors against medians of n runs keep part of it."]
    lines += ["", f"Best epoch {int(metrics['best_epoch'])} of {num_epochs}; promotion metric "
              f"`{promotion_metric}` = {metrics[promotion_metric]:.3f}."]
    return "\n".join(lines) + "\n"


def headline(metrics: Mapping[str, float], heldout_knob: str) -> str:
    """One line of a training run's final `metrics`: the MLP's test MAPE and within-10% share, the
    baselines' prefill MAPE and, when trained, the held-out-config model's MAPE."""
    m = metrics
    heldout = (f"; held-out {heldout_knob} MAPE prefill {m['heldout_config_mape_prefill']:.2f}%, "
               f"decode {m['heldout_config_mape_decode']:.2f}%" if "heldout_config_mape_prefill" in m else "")
    return (f"test MAPE prefill {m['test_mape_prefill']:.2f}%, decode {m['test_mape_decode']:.2f}%, within10 prefill "
            f"{m['test_within10_prefill']:.3f}, decode {m['test_within10_decode']:.3f} (baselines prefill: "
            + ", ".join(f"{b} {m[f'baseline_{b}_test_mape_prefill']:.2f}%" for b in BASELINES) + f"){heldout}")
