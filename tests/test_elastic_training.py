"""Elastic training: loss goes down, records carry the agreed keys, checkpoints resume exactly, and an
exception from the caller's on_epoch propagates."""

from pathlib import Path

import pytest
import torch

from core.knobs import TIERS
from core.vlm.base_vlm import BaseVLM, space_for
from core.vlm.elastic_training import (
    TRAINING_KEYS, VALIDATION_KEYS, ElasticTrainConfig, export_trained, exported_training, recorded_history,
    sample_train_config, train_base_vlm,
)
from core.vqa.suite import DATASETS
from tests.helpers import TINY_BASE_VLM as TINY


def _config(**kw) -> ElasticTrainConfig:
    base = dict(
        seed=0, epochs=2, batch_size=8, lr=3e-3, warmup_steps=1, train_samples_per_dataset=8,
        val_samples_per_dataset=2, num_threads=2, reader_word_steps=2, reader_steps=3, model=TINY,
    )
    base.update(kw)
    return ElasticTrainConfig(**base)


class _Stop(Exception):
    pass


def test_a_micro_run_decreases_the_loss_and_reports_every_key(tmp_path: Path):
    records = []
    model, history = train_base_vlm(_config(epochs=4), on_epoch=records.append)
    assert records == history and [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["train_loss"] < history[0]["train_loss"] - 0.5
    for r in history:
        assert {"epoch", *TRAINING_KEYS, *VALIDATION_KEYS} <= set(r)
        # the reported full-config score is the mean over data sets, not over samples
        assert r["val_vqa_score_full"] == pytest.approx(sum(r[f"val_vqa_score_{d}"] for d in DATASETS) / len(DATASETS))
    export_trained(model, history, _config(epochs=4), tmp_path)
    assert exported_training(tmp_path) == (history, _config(epochs=4).to_dict())
    assert exported_training(tmp_path / "nothing-here") == ([], None)


def test_config_validation_names_the_field():
    _config().validate()
    for bad, field in ((dict(batch_size=0), "batch_size"), (dict(epochs=-1), "epochs"), (dict(top_k_weights=(0, 0, 0, 0, 0)), "top_k_weights"),
                       (dict(block_weights=(1, 1)), "block_weights"), (dict(tier_weights=(1, -1, 1)), "tier_weights")):
        with pytest.raises(ValueError, match=field):
            _config(**bad).validate()


def test_resume_continues_after_the_last_checkpoint_and_matches_an_uninterrupted_run(tmp_path: Path):
    straight, straight_history = train_base_vlm(_config())

    def stop_after_first(record: dict) -> None:
        if record["epoch"] == 1:
            raise _Stop()

    with pytest.raises(_Stop):  # the caller's exception propagates, after the epoch is checkpointed
        train_base_vlm(_config(), on_epoch=stop_after_first, checkpoint_dir=tmp_path)
    assert (tmp_path / "model" / "model.safetensors").is_file()
    assert [r["epoch"] for r in recorded_history(tmp_path)] == [1]  # what a resumed run logs before it trains
    assert recorded_history(tmp_path / "nothing-here") == []

    seen = []
    resumed, history = train_base_vlm(_config(), on_epoch=seen.append, checkpoint_dir=tmp_path, resume=True)
    assert [r["epoch"] for r in seen] == [2] and [r["epoch"] for r in history] == [1, 2]
    # The saved state is bit-identical to the live one and the first resumed step matches exactly;
    # later steps agree to float rounding only (tensors at other addresses take other vectorised
    # paths, and a rounding-level change can flip a top-k routing choice), hence the tolerances.
    # A resume that restarted or skipped the epoch would miss them by orders of magnitude.
    assert history[1]["train_loss"] == pytest.approx(straight_history[1]["train_loss"], rel=1e-3)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=5e-3), name
    assert torch.equal(BaseVLM.load_pretrained(tmp_path / "model").decoder.lm_head.weight, resumed.decoder.lm_head.weight)


def test_resume_refuses_a_checkpoint_of_another_config(tmp_path: Path):
    train_base_vlm(_config(epochs=1), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="different training config"):
        train_base_vlm(_config(epochs=1, lr=1e-3), checkpoint_dir=tmp_path, resume=True)


def test_knob_sampling_follows_the_weights_and_draws_random_subsets():
    import random

    space = space_for(TINY)
    rng = random.Random(0)
    draws = [sample_train_config(rng, space, _config(top_k_weights=(1, 1, 1, 1, 1))) for _ in range(2000)]
    configs = [c for c, _ in draws]
    assert {c.tier for c in configs} == set(TIERS)
    assert {c.top_k for c in configs} == set(space.top_k_options)
    assert {c.num_active_blocks for c in configs} == set(space.block_options)
    # the weights given: three quarters of the batches at the full top_k, 5% at the smallest
    weighted = _config(top_k_weights=(0.05, 0.05, 0.05, 0.1, 0.75))
    draws = [sample_train_config(rng, space, weighted) for _ in range(2000)]
    configs = [c for c, _ in draws]
    full_k = sum(c.top_k == space.default_top_k for c in configs) / len(configs)
    smallest_k = sum(c.top_k == space.top_k_options[0] for c in configs) / len(configs)
    assert 0.7 < full_k < 0.8 and 0.03 < smallest_k < 0.07, (full_k, smallest_k)
    assert any(order is not None for _, order in draws)
    assert all(order is None for c, order in draws if c.num_active_blocks == space.num_blocks)
    for c in configs:
        space.validate(c)
    # full-config weights train the full top_k and all blocks only; the tier still varies
    only_full = _config(top_k_weights=(0, 0, 0, 0, 1), block_weights=(0, 0, 0, 0, 1))
    configs = [sample_train_config(rng, space, only_full)[0] for _ in range(200)]
    assert {(c.top_k, c.num_active_blocks) for c in configs} == {(space.default_top_k, space.num_blocks)}
    assert {c.tier for c in configs} == set(TIERS)
    # before full_model_fraction of training, only the tier varies
    early = [sample_train_config(rng, space, _config(), progress=0.1)[0] for _ in range(100)]
    assert {(c.top_k, c.num_active_blocks) for c in early} == {(space.default_top_k, space.num_blocks)}
