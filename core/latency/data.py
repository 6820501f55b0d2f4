"""Profiling tables as latency predictors read them: the input gate, per-(sample, config) medians and
the train / val / test splits.

  `load_profile_table` / `prepare_table`  validated rows of a ProfileStore (schema gate, data-set filter)
  `aggregate_runs`                         one row per (sample, config): medians over the run_index repeats
  `split_by_sample`                        no sample_id in two splits
  `split_heldout_config`                   one knob value never trained on (test = exactly those rows;
                                           `knob_value` types a value given as text)
  `split_record`                           the sample ids of both splits, JSON-able, to score a model later
  `training_data`                          a table and both splits of it, in one call

The estimator (core.latency.estimator), its baselines and the controllers read tables through this
module, so every consumer sees the same rows and the same split rules.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pandas as pd

from core.knobs import KNOBS, TIERS, KnobOutOfSpaceError, get_space
from core.profiling.schema import ProfileSchemaError, validate_profile
from core.profiling.store import ProfileStore, ProfileStoreError
from core.timing import PREDICTED_COMPONENTS, STAGE_COLUMNS

# What a latency predictor predicts, in its output order (vision, prefill, decode per token).
TARGETS: tuple[str, ...] = tuple(PREDICTED_COMPONENTS.values())
# One (sample, config): the repeats of a row differ only in run_index.
GROUP_COLUMNS: tuple[str, ...] = ("sample_id",) + KNOBS
_DECODE = TARGETS.index(PREDICTED_COMPONENTS["decode"])


class EstimatorError(ValueError):
    """Bad input to the latency estimator; the message is one line naming the file, field or parameter."""


# --- input gate ------------------------------------------------------------------------------------
def prepare_table(df: pd.DataFrame | None, source: str = "profile table", dataset_names: list[str] | None = None) -> pd.DataFrame:
    """Validate a profiling table and keep the wanted data sets.

    In: rows in the profile schema, `source` (a path or name used in errors), optional data set
    names. Out: the validated rows (schema dtypes). Raises EstimatorError for an empty table,
    a schema break (NaN/negative latency etc., via validate_profile, naming the field) or an
    unknown data set name.
    """
    if df is None or len(df) == 0:
        raise EstimatorError(f"{source} is empty: no profiling rows")
    try:
        out = validate_profile(df, source)
    except ProfileSchemaError as exc:
        raise EstimatorError(str(exc)) from None
    if dataset_names:
        known = sorted(out["dataset"].unique())
        unknown = [d for d in dataset_names if d not in known]
        if unknown:
            raise EstimatorError(f"field dataset: unknown data set name(s) {unknown} in {source} (has {known})")
        out = out[out["dataset"].isin(list(dataset_names))].reset_index(drop=True)
    return out


def load_profile_table(results_dir: str | os.PathLike[str], dataset_names: list[str] | None = None) -> pd.DataFrame:
    """All rows of `dataset_names` (default all) from a ProfileStore results directory, validated.

    Store errors (missing directory, unknown data set, schema break naming the part file) come
    back as EstimatorError with the store's one-line message.
    """
    try:
        df = ProfileStore(results_dir).load(dataset_names)
    except (ProfileStoreError, ProfileSchemaError) as exc:
        raise EstimatorError(str(exc)) from None
    return prepare_table(df, source=str(results_dir))


def target_arrays(df: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(targets (N, 3) ms in TARGETS order, mask (N, 3) bool: False where decode per token is undefined)."""
    y = df[list(TARGETS)].to_numpy(dtype=np.float64)
    mask = np.ones_like(y, dtype=bool)
    if "output_tokens" in df:
        mask[:, _DECODE] = df["output_tokens"].to_numpy() > 1
    mask &= y > 0  # a zero latency has no log; only undefined decode is 0 in a valid table
    return y, mask


def aggregate_runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (sample_id, tier, top_k, num_active_blocks): medians over run_index.

    Out: the group keys, the request columns (first value; they do not vary over runs), median
    latencies, output_tokens (median, rounded) and n_runs. This is the truth a latency predictor
    is evaluated against.
    """
    missing = [c for c in GROUP_COLUMNS if c not in df.columns]
    if missing:
        raise EstimatorError(f"field(s) {missing} missing: cannot group runs")
    grouped = df.groupby(list(GROUP_COLUMNS), sort=True, observed=True)
    firsts = [c for c in ("dataset", "backend", "device", "vision_tokens", "text_tokens", "crops") if c in df]
    latencies = [c for c in (*STAGE_COLUMNS, PREDICTED_COMPONENTS["decode"]) if c in df]
    out = grouped[firsts].first()
    if latencies:
        out = out.join(grouped[latencies].median())
    if "output_tokens" in df:
        out["output_tokens"] = grouped["output_tokens"].median().round().astype("int64")
    out["n_runs"] = grouped.size()
    return out.reset_index()


# --- splits ----------------------------------------------------------------------------------------
@dataclass
class EstimatorSplit:
    """train / val / test rows plus what made them; unpacks as `train, val, test = split`."""

    train: pd.DataFrame
    val: pd.DataFrame
    test: pd.DataFrame
    kind: str  # "by_sample" or "heldout_config"
    train_fraction: float
    seed: int
    heldout_knob: str | None = None
    heldout_value: object = None  # a plain Python value (an option of the knob space)

    def __iter__(self) -> Iterator[pd.DataFrame]:
        return iter((self.train, self.val, self.test))

    def sizes(self) -> dict[str, int]:
        """Rows, distinct samples and distinct configs per split."""
        out: dict[str, int] = {}
        for name, part in (("train", self.train), ("val", self.val), ("test", self.test)):
            out[f"{name}_rows"] = int(len(part))
            out[f"{name}_samples"] = int(part["sample_id"].nunique())
            out[f"{name}_configs"] = int(len(part[list(KNOBS)].drop_duplicates()))
        return out

    def as_params(self) -> dict[str, object]:
        """Flat dict to log: split kind, seed, fraction, held-out knob/value, sizes."""
        return {"split": self.kind, "split_seed": self.seed, "train_fraction": self.train_fraction,
                "heldout_knob": self.heldout_knob, "heldout_value": self.heldout_value, **self.sizes()}


def _check_splittable(df: pd.DataFrame, train_fraction: float) -> None:
    if df is None or len(df) == 0:
        raise EstimatorError("profile table is empty: nothing to split")
    if "sample_id" not in df.columns:
        raise EstimatorError("field sample_id missing: cannot split by sample")
    if not 0 < train_fraction < 1:
        raise EstimatorError(f"parameter train_fraction must lie in (0, 1), got {train_fraction}")


def _take_samples(df: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    return df[df["sample_id"].isin(ids.tolist())].reset_index(drop=True)


def split_by_sample(df: pd.DataFrame, train_fraction: float = 0.8, seed: int = 0) -> EstimatorSplit:
    """Split rows so that no sample_id is in two splits.

    Samples are shuffled with `seed`; round((1 - train_fraction) * n) go to test, of the rest
    train_fraction to train and the remainder to val (each split gets at least one sample, so a
    table needs >= 3 samples). Every row of a sample (all configs, all runs) stays together.
    """
    _check_splittable(df, train_fraction)
    ids = np.array(sorted(df["sample_id"].astype(str).unique()))
    n = len(ids)
    if n < 3:
        raise EstimatorError(f"field sample_id: split_by_sample needs >= 3 distinct samples, the table has {n}")
    ids = ids[np.random.default_rng(seed).permutation(n)]
    n_test = min(max(1, round((1 - train_fraction) * n)), n - 2)
    n_rest = n - n_test
    n_train = min(max(1, round(train_fraction * n_rest)), n_rest - 1)
    train_ids, val_ids, test_ids = ids[:n_train], ids[n_train:n_rest], ids[n_rest:]
    return EstimatorSplit(_take_samples(df, train_ids), _take_samples(df, val_ids), _take_samples(df, test_ids),
                          kind="by_sample", train_fraction=train_fraction, seed=seed)


def knob_options(df: pd.DataFrame, knob: str) -> list:
    """The options of `knob` in the knob space of the table's backend (values seen, if several backends)."""
    if knob not in KNOBS:
        raise EstimatorError(f"parameter knob must be one of {list(KNOBS)}, got {knob!r}")
    backends = df["backend"].unique().tolist() if "backend" in df else []
    if len(backends) == 1:
        try:
            space = get_space(str(backends[0]))
        except KnobOutOfSpaceError as exc:
            raise EstimatorError(f"field backend: {exc}") from None
        return list(TIERS) if knob == "tier" else list(space.top_k_options if knob == "top_k" else space.block_options)
    values = df[knob].unique().tolist()
    return [t for t in TIERS if t in values] if knob == "tier" else sorted(values)


def knob_value(knob: str, text: str, parameter: str = "value") -> object:
    """A knob value typed from text: tier names stay strings, top_k and blocks are integers; None for ""."""
    if not text:
        return None
    if knob == "tier":
        return text
    try:
        return int(text)
    except ValueError:
        raise EstimatorError(f"parameter {parameter}={text!r} is not an integer {knob}") from None


def split_heldout_config(
    df: pd.DataFrame, knob: str = "top_k", value: object = None, train_fraction: float = 0.8, seed: int = 0
) -> EstimatorSplit:
    """Hold out every config with `knob == value`: test is exactly those rows (all samples), train
    and val never see that value and are split by sample (no sample in both).

    `value` defaults to the middle option of the knob in the backend's knob space (top_k 8 of
    4..12 for MolmoE), so the test asks for interpolation, not extrapolation.
    """
    _check_splittable(df, train_fraction)
    options = knob_options(df, knob)
    if value is None:
        value = options[len(options) // 2]
    if value not in options:
        raise EstimatorError(f"parameter value: {knob}={value!r} is not an option (options: {options})")
    value = options[options.index(value)]  # the option itself: a plain Python value even for a numpy input
    is_heldout = (df[knob] == value).to_numpy()
    if not is_heldout.any():
        raise EstimatorError(f"field {knob}: no rows with {knob}={value!r} to hold out")
    if is_heldout.all():
        raise EstimatorError(f"field {knob}: every row has {knob}={value!r}; nothing left to train on")
    rest = df[~is_heldout]
    ids = np.array(sorted(rest["sample_id"].astype(str).unique()))
    if len(ids) < 2:
        raise EstimatorError(f"field sample_id: split_heldout_config needs >= 2 samples, the table has {len(ids)}")
    ids = ids[np.random.default_rng(seed).permutation(len(ids))]
    n_val = min(max(1, round((1 - train_fraction) * len(ids))), len(ids) - 1)
    return EstimatorSplit(_take_samples(rest, ids[n_val:]), _take_samples(rest, ids[:n_val]),
                          df[is_heldout].reset_index(drop=True), kind="heldout_config",
                          train_fraction=train_fraction, seed=seed, heldout_knob=knob, heldout_value=value)


def _sample_ids(part: pd.DataFrame) -> list[str]:
    return sorted(part["sample_id"].astype(str).unique().tolist())


def split_record(by_sample: EstimatorSplit, heldout: EstimatorSplit | None = None) -> dict[str, object]:
    """The sample ids of every split (and the held-out knob value), JSON-able: with it a trained model
    can later be scored on exactly the rows it never saw (what `evaluate_estimator` does by default)."""
    record: dict[str, object] = {
        "seed": by_sample.seed, "train_split": by_sample.train_fraction,
        "by_sample": {name: _sample_ids(part) for name, part in zip(("train", "val", "test"), by_sample)},
    }
    if heldout is not None:
        record["heldout_config"] = {"knob": heldout.heldout_knob, "value": heldout.heldout_value,
                                    "train": _sample_ids(heldout.train), "val": _sample_ids(heldout.val)}
    return record


@dataclass
class TrainingData:
    """A validated profiling table and the splits a latency predictor trains and is scored on."""

    table: pd.DataFrame
    split: EstimatorSplit  # by sample
    heldout: EstimatorSplit | None  # one knob value never trained on; None when not asked for


def training_data(results_dir: str | os.PathLike[str], dataset_names: list[str] | None, train_fraction: float, seed: int,
                  heldout_knob: str | None = "top_k", heldout_value: object = None) -> TrainingData:
    """The table of `dataset_names` (default all) in `results_dir`, split by sample and, unless
    `heldout_knob` is None, with `heldout_value` of that knob held out (default: its middle option)."""
    table = load_profile_table(results_dir, dataset_names)
    split = split_by_sample(table, train_fraction, seed)
    heldout = split_heldout_config(table, heldout_knob, heldout_value, train_fraction, seed) if heldout_knob else None
    return TrainingData(table, split, heldout)
