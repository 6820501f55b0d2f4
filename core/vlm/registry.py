"""Backends by name: the one place that knows which VLM backends exist and how to build them."""

from __future__ import annotations

from typing import Sequence

from core.vlm.backend import BACKENDS, VLMBackend
from core.vlm.base_vlm import BaseVLMBackend
from core.vlm.molmoe_arch import MolmoeArchBackend
from core.vlm.molmoe_checkpoint import load_molmoe_checkpoint


def load_backend(
    name: str,
    device: str = "cpu",
    checkpoint_dir: str | None = None,
    size: str = "reference",
    drop_order: Sequence[int] | None = None,
    engine: str = "eager",
    model_path: str = "",
) -> VLMBackend:
    """Build a backend by name: `base_vlm` from a trained checkpoint directory, `molmoe_arch` at a size
    preset (random weights) or, with `model_path`, from a local MolmoE-1B release directory (its weights
    and tokenizer, `core.vlm.molmoe_checkpoint`; `size` is then ignored). `drop_order` (ascending
    importance) replaces the default one; `engine` (molmoe_arch only) picks eager or CUDA-graph generation."""
    if model_path and name != "molmoe_arch":
        raise ValueError(f"model_path applies to backend=molmoe_arch (a MolmoE-1B release directory), not {name}")
    if name == "base_vlm":
        if not checkpoint_dir:
            raise ValueError("backend base_vlm needs a checkpoint directory (base_model)")
        backend: VLMBackend = BaseVLMBackend.from_pretrained(checkpoint_dir, device=device)
    elif name == "molmoe_arch":
        backend = (load_molmoe_checkpoint(model_path, device=device, engine=engine) if model_path
                   else MolmoeArchBackend(size=size, device=device, engine=engine))
    else:
        raise ValueError(f"backend={name!r} is unknown (choose from: {', '.join(BACKENDS)})")
    if drop_order is not None:
        backend.set_drop_order(drop_order)
    return backend
