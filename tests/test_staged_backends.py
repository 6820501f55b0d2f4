"""The stage-by-stage path (core.vlm.backend.StagedVLM) of both backends gives what `answer` gives, and
samples rebuild by id from the suite and from the real files (what controllers and adaptive inference
read off a measured table)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.control.data import sample_features
from core.timing import StageClock
from core.vlm.base_vlm import BaseVLMBackend
from core.vlm.molmoe_arch import MolmoeArchBackend
from core.vqa import sources
from core.vqa.suite import make_sample
from tests.test_real_vqa_data import _coco_vqa


@pytest.fixture(scope="module", params=["base_vlm", "molmoe_arch"])
def backend(request):
    torch.set_num_threads(1)
    if request.param == "base_vlm":
        return BaseVLMBackend.from_pretrained("data/base_vlm")
    return MolmoeArchBackend(size="tiny", device="cpu", seed=1)


def test_stage_by_stage_answers_as_answer_does(backend):
    sample = make_sample("synth_textvqa", "test", 3)
    for config in backend.space.grid()[::6]:
        features = backend.request_features(sample)
        vision = backend.encode_tier(sample, config.tier, features.global_view)
        ids = backend.generate_from_vision(vision, sample, config, sample.max_new_tokens, StageClock(backend.device))
        result = backend.answer(sample, config)
        assert backend.decode_answer(ids) == result.text and len(ids) == result.output_tokens
        assert vision.shape[1] == result.vision_tokens
        assert features.text_tokens == result.text_tokens and features.crops[config.tier] == result.crops


def test_sample_features_of_any_backend_match_its_request_features(backend):
    samples = [make_sample("synth_countvqa", "val", i) for i in range(3)]
    frame = sample_features(backend, samples)
    d = backend.request_features(samples[0]).question_embedding.shape[0]
    assert list(frame["sample_id"]) == [s.sample_id for s in samples] and (frame["split"] == "val").all()
    for row, sample in zip(frame.itertuples(), samples):
        features = backend.request_features(sample)
        q = frame.loc[row.Index, [f"q_emb_{j}" for j in range(d)]].to_numpy(dtype=np.float32)
        gv = frame.loc[row.Index, [f"gv_{j}" for j in range(d)]].to_numpy(dtype=np.float32)
        np.testing.assert_allclose(q, features.question_embedding, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(gv, features.global_view_mean, rtol=1e-4, atol=1e-5)
        assert row.text_tokens == features.text_tokens and row.crops_high == features.crops["high"]


def test_samples_rebuild_by_id_from_the_suite_and_from_real_files(tmp_path):
    suite_ids = ["synth_attrvqa:test:4", "synth_textvqa:val:0"]
    assert [s.question for s in sources.samples_from_ids(suite_ids, "")] == \
        [make_sample("synth_attrvqa", "test", 4).question, make_sample("synth_textvqa", "val", 0).question]
    _coco_vqa(tmp_path, "coco_2014_vqa", "val")
    real = sources.samples_from_ids(["coco_2014_vqa:val:2", "coco_2014_vqa:val:0", "coco_2014_vqa:val:2"], str(tmp_path))
    assert [s.question for s in real] == ["is it raining?", "what color is the bus?", "is it raining?"]
    with pytest.raises(ValueError, match="coco_2014_vqa:val:3 is not a question of coco_2014_vqa val"):
        sources.samples_from_ids(["coco_2014_vqa:val:3"], str(tmp_path))
    with pytest.raises(ValueError, match="is not <dataset>:<split>:<index>"):
        sources.samples_from_ids(["coco_2014_vqa-7"], str(tmp_path))
