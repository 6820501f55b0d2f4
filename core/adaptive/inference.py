"""Adaptive inference on a stage-by-stage backend (core.vlm.backend.StagedVLM: the base VLM or
molmoe_arch): one request at a time, under a latency budget.

For each request (a VQA sample and a budget B in ms), timed from arrival to answer:
  1. features    the controller's inputs, which the model computes anyway: the question's token
                 count and mean embedding, the global view encoded once (its tokens are reused by the
                 vision stage: the global view is the same crop at every tier) and its mean, and each
                 tier's crop count (from the image size alone);
  2. decision    the controller's rule on those features, its fit check's latencies multiplied by the
                 calibration's drift (how much slower than the controller's static calibration the
                 machine is now: the same check as the budget divided by it; the net's heads read the
                 budget as a fraction of the L_full measured here, as they were trained); the tier it
                 picks is final, its (top_k, blocks) provisional;
  3. vision      the tier's tiles encoded (measured);
  4. guardrail   (core.adaptive.guardrail) the provisional (top_k, blocks) must fit what is left of B,
                 at the calibrated P90; otherwise a step down within the tier;
  5. generate    prefill and decode under the final config (measured per stage);
  6. calibration the measured / predicted ratio of each stage updates the online factors.
The request's T_total_ms is the wall time of all six; overhead_ms is steps 2, 4 and 6 (the work that
exists only because the platform adapts).
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from core.adaptive.calibration import OnlineCalibration
from core.adaptive.guardrail import Guardrail
from core.control.decision import LearnedController, grid_arrays
from core.knobs import TIERS, KnobConfig
from core.timing import StageClock
from core.vlm.backend import StagedVLM
from core.vqa.metrics import vqa_score
from core.vqa.sample import VQASample


@dataclass
class AdaptiveAnswer:
    """One answered request (a row of the run's `requests.csv`)."""

    sample_id: str
    dataset: str
    budget_ms: float
    text: str
    accuracy: float  # NaN for a served request without reference answers
    tier: str
    top_k: int
    num_active_blocks: int
    controller_top_k: int  # the controller's provisional choice before the guardrail
    controller_num_active_blocks: int
    intervened: bool
    fits: bool  # False: no config's calibrated prediction fitted (answered with the fastest)
    output_tokens: int
    T_features_ms: float
    T_decision_ms: float
    T_vision_ms: float
    T_guardrail_ms: float
    T_prefill_ms: float
    T_decode_ms: float
    T_calibration_ms: float
    T_total_ms: float  # wall time from arrival to answer
    overhead_ms: float  # decision + guardrail + calibration
    factor_vision: float  # the calibration factors after this request
    factor_prefill: float
    factor_decode: float

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _score(text: str, sample: VQASample) -> float:
    """The VQA score, or NaN for a served request (no reference answers)."""
    return vqa_score(text, sample.answers) if sample.answers else float("nan")


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1e3


class AdaptiveInference:
    """Answers requests adaptively (module doc) with a stage-by-stage backend, a controller, a guardrail and a calibration."""

    def __init__(self, backend: StagedVLM, controller: LearnedController, guardrail: Guardrail,
                 calibration: OnlineCalibration, l_full_ms: float | None = None) -> None:
        """`l_full_ms`: the full config's latency measured on this machine, if known. The net's heads read
        the budget as a fraction of it (B / L_full, as they were trained), while the fit check and the
        guardrail compare milliseconds; unknown, the fraction is of the controller's own L_full."""
        self.backend, self.controller, self.guardrail, self.calibration = backend, controller, guardrail, calibration
        self.budget_scale = controller.l_full_ms / l_full_ms if l_full_ms else 1.0
        self.space = backend.space
        grid = grid_arrays(controller.options)
        self.configs = [KnobConfig(str(t), int(k), int(b))  # by grid index: no numpy indexing per request
                        for t, k, b in zip(grid["tier"], grid["top_k"], grid["num_active_blocks"])]

    def _sync(self) -> None:
        if self.backend.device.type == "cuda":
            torch.cuda.synchronize(self.backend.device)

    def _features(self, sample: VQASample) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
        """(1, d) question features, (1, d) global-view features, (7,) request sizes, and the global
        view's vision tokens (1, tokens_per_crop, d)."""
        features = self.backend.request_features(sample)
        crops_per_tier = [features.crops[t] for t in TIERS]
        sizes = np.array([features.text_tokens, *crops_per_tier,
                          *((n + 1) * self.space.tokens_per_crop for n in crops_per_tier)], dtype=np.float64)
        return (features.question_embedding[None], features.global_view_mean[None], sizes, features.global_view)

    def _config(self, index: int) -> KnobConfig:
        return self.configs[index]

    @torch.inference_mode()
    def answer(self, sample: VQASample, budget_ms: float) -> AdaptiveAnswer:
        controller = self.controller
        start = time.perf_counter()
        q, gv, sizes, glob_tokens = self._features(sample)
        self._sync()
        t_features = _ms(start)

        t = time.perf_counter()
        latency = self.guardrail.request_latency(sizes)
        p90 = latency.p90
        length = controller.output_length.predict_one(q)
        steps = max(length - 1, 0)
        means = latency.stage_means
        drift = self.calibration.drift({"vision": means["vision"], "prefill": means["prefill"], "decode": means["decode"] * steps})
        # The rule runs in the controller's units: the budget as the same fraction of its L_full as B is of
        # the L_full measured here (what its heads and prices read), the fit check's latencies scaled alike.
        # Those are the guardrail's stage P90s (one estimator pass per request serves both) times the
        # calibration's drift (the same check as the budget divided by it).
        budget = np.array([budget_ms * self.budget_scale])
        upper = latency.total(steps)[None] * (controller.latency_factor * drift * self.budget_scale)
        index, _ = controller.choose(controller.head_log_probs(q, gv if controller.net.uses_global_view else None,
                                                               budget, normalise=False), upper, budget)
        first = self._config(int(index[0]))
        t_decision = _ms(t)

        clock = StageClock(self.backend.device)
        with clock.stage("vision"):
            vision_tokens = self.backend.encode_tier(sample, first.tier, glob_tokens)
        self._sync()

        t = time.perf_counter()
        factors = self.calibration.factors()
        decision = self.guardrail.check(int(index[0]), p90, length - 1, factors, budget_ms - _ms(start))
        final = self._config(decision.index)
        t_guardrail = _ms(t)

        generated = self.backend.generate_from_vision(vision_tokens, sample, final, sample.max_new_tokens, clock)
        stages = clock.durations_ms()
        text = self.backend.decode_answer(generated)

        t = time.perf_counter()
        measured = {"vision": sum(stages["vision"]), "prefill": sum(stages["prefill"]), "decode": sum(stages.get("decode", []))}
        # The estimator's vision is the whole image stage (preprocessing, the global view and the tiles); here
        # the global view was encoded with the features, so its ratio counts the features' time too.
        observed = {**measured, "vision": measured["vision"] + t_features}
        forwards = max(len(generated) - 1, 0)
        self.calibration.update(observed, {"vision": float(p90[decision.index, 0]), "prefill": float(p90[decision.index, 1]),
                                           "decode": float(p90[decision.index, 2]) * forwards})
        t_calibration = _ms(t)
        total = _ms(start)
        after = self.calibration.factors()
        return AdaptiveAnswer(
            sample.sample_id, sample.dataset, float(budget_ms), text, _score(text, sample), final.tier,
            final.top_k, final.num_active_blocks, first.top_k, first.num_active_blocks, decision.intervened,
            decision.fits, len(generated), t_features, t_decision, measured["vision"], t_guardrail, measured["prefill"],
            measured["decode"], t_calibration, total, t_decision + t_guardrail + t_calibration,
            after["vision"], after["prefill"], after["decode"])


def freeze_heap() -> None:
    """Move every object alive now (the models, the libraries) out of the garbage collector's
    generations (`gc.freeze`), once, before serving: a collection that falls inside a request then walks
    what requests allocate, not the hundreds of thousands of objects torch, transformers and MLflow hold."""
    gc.collect()
    gc.freeze()


def answer_static(backend: StagedVLM, sample: VQASample, config: KnobConfig, budget_ms: float) -> dict[str, object]:
    """A yardstick's answer (a fixed config) to the same request, timed the same way (wall time)."""
    start = time.perf_counter()
    result = backend.answer(sample, config)
    total = _ms(start)
    return {"sample_id": sample.sample_id, "dataset": sample.dataset, "budget_ms": float(budget_ms), "text": result.text,
            "accuracy": _score(result.text, sample), **config.as_dict(), "output_tokens": result.output_tokens,
            "T_vision_ms": result.T_vision_ms, "T_prefill_ms": result.T_prefill_ms, "T_decode_ms": result.T_decode_ms,
            "T_total_ms": total}
