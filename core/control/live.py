"""`reward_source=live`: the base VLM really answers each drawn config, and the reward reads that
answer's VQA score and its measured end-to-end T_total (what the seed's joint controller did, with
the knobs applied this time). Slow, one timed answer per rollout (tens of ms on CPU), so it is for
small, real trainings; replay (core.control.grpo.ReplayRollouts) gives the headline results.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from core.control.decision import ControllerError, grid_arrays
from core.knobs import KnobConfig
from core.vlm.backend import VLMBackend
from core.vqa import sources


class LiveRollouts:
    """RolloutSource over a backend: rows index `sample_ids` ("<dataset>:<split>:<index>" of the suite, or
    of the real files under `data_root`), answers scored as `core.vqa.sources` scores them."""

    name = "live"

    def __init__(self, backend: VLMBackend, sample_ids: Sequence[str], options: dict[str, list], data_root: str = "") -> None:
        self.backend, self.grid = backend, grid_arrays(options)
        try:
            self.samples = sources.samples_from_ids(sample_ids, data_root)
        except ValueError as exc:
            raise ControllerError(f"live rollouts: {exc}") from None
        self.score_fn = sources.answer_score(data_root)
        self.answers = 0

    def score(self, rows: np.ndarray, configs: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        accuracy = np.zeros(configs.shape)
        latency = np.zeros(configs.shape)
        for i, row in enumerate(rows):
            sample = self.samples[int(row)]
            for j, index in enumerate(configs[i]):
                config = KnobConfig(str(self.grid["tier"][index]), int(self.grid["top_k"][index]),
                                    int(self.grid["num_active_blocks"][index]))
                result = self.backend.answer(sample, config)
                accuracy[i, j] = self.score_fn(result.text, sample.answers)
                latency[i, j] = result.T_total_ms
                self.answers += 1
        return accuracy, latency
