"""Elastic training: loss goes down, records carry the agreed keys, checkpoints resume exactly, and an
exception from the caller's on_epoch propagates."""

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

from core.knobs import TIERS
from core.vlm.base_vlm import BaseVLM, build_base_vlm, space_for
from core.vlm.elastic_training import (
    TRAINING_KEYS, VALIDATION_KEYS, ElasticTrainConfig, _examples, collate, export_trained, exported_training,
    recorded_history, sample_train_config, train_base_vlm,
)
from core.vqa.suite import DATASETS, load_mixed_split
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


def test_init_from_starts_from_a_trained_checkpoint_and_skips_stage_one(tmp_path: Path):
    parent, _ = train_base_vlm(_config(epochs=1), checkpoint_dir=tmp_path / "parent")
    child_config = _config(epochs=0, init_from=str(tmp_path / "parent"))
    child, history = train_base_vlm(child_config, checkpoint_dir=tmp_path / "child")
    assert history == []  # no epochs: the weights are the parent's, untouched by a stage 1
    for (name, a), b in zip(parent.state_dict().items(), child.state_dict().values()):
        assert torch.equal(a, b), name
    # one epoch of fine-tuning moves them, and it resumes like any run
    tuned, tuned_history = train_base_vlm(_config(epochs=1, init_from=str(tmp_path / "parent")), checkpoint_dir=tmp_path / "tuned")
    assert [r["epoch"] for r in tuned_history] == [1]
    assert not torch.equal(tuned.decoder.lm_head.weight, parent.decoder.lm_head.weight)


def test_init_from_names_a_directory_without_a_checkpoint_or_of_another_architecture(tmp_path: Path):
    with pytest.raises(ValueError, match="init_from=.*expected a training checkpoint"):
        train_base_vlm(_config(epochs=1, init_from=str(tmp_path / "missing")))
    train_base_vlm(_config(epochs=0), checkpoint_dir=tmp_path / "parent")
    wider = dataclasses.replace(TINY, expert_dim=TINY.expert_dim * 2)
    with pytest.raises(ValueError, match="init_from=.*another architecture"):
        train_base_vlm(_config(epochs=1, init_from=str(tmp_path / "parent"), model=wider))


def test_the_router_entropy_bonus_is_subtracted_from_the_loss_and_its_gradient_spreads_the_gates():
    model = build_base_vlm(dataclasses.replace(TINY, router_entropy_coef=1.0), seed=0)
    with torch.no_grad():  # a trained router is peaked; the initial one is uniform (zeros)
        for layer in model.decoder.model.layers:
            layer.mlp.gate.weight.normal_(0, 2.0)
    example = _examples(load_mixed_split(DATASETS, "train", 2, 0), 0)
    batch = collate(model, [e for e in example if e.sample.image.size == example[0].sample.image.size][:1],
                    random.Random(0), 2)
    batch.pop("reader_targets")
    parts = model.teacher_forced_loss(**batch)
    assert 0 < parts.router_entropy.item() < math.log(TINY.num_experts)
    assert parts.total.item() == pytest.approx((parts.answer_ce + TINY.router_aux_loss_coef * parts.router_aux
                                                - parts.router_entropy).item(), rel=1e-5)
    gates = [layer.mlp.gate.weight for layer in model.decoder.model.layers]
    grads = torch.autograd.grad(-parts.router_entropy, gates)
    with torch.no_grad():
        for weight, grad in zip(gates, grads):
            weight -= 0.5 * grad
    assert model.teacher_forced_loss(**batch).router_entropy.item() > parts.router_entropy.item()
