"""A local MolmoE release directory loads into molmoe_arch by name mapping, and nothing else does.

The checkpoints here are synthetic: the tiny molmoe_arch backend's random weights written under the
release's exact tensor names and layouts (fused qkv, megablocks' stacked experts, wte.embedding +
new_embedding, ViT resblocks, Linear patch embedding), a release-layout config.json and a tokenizer.json
built with `tokenizers`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.knobs import KnobConfig
from core.vlm.molmoe_arch import MolmoeArchBackend, synthetic_latency_samples
from core.vlm.molmoe_checkpoint import (
    LM,
    TARGET_LEFT_AT_INIT,
    VISION,
    CheckpointError,
    _target_parameters,
    export_release_tensors,
    load_molmoe_checkpoint,
    plan_checkpoint,
    release_config_dict,
    weight_rules,
    write_word_level_tokenizer,
    write_release_checkpoint,
)

WORDS = ["User", ":", "Assistant", "what", "color", "is", "the", "shape", "?", "how", "many"]


def write_checkpoint(directory: Path, tensors: dict[str, torch.Tensor], config: dict, text_vocab: int) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    write_word_level_tokenizer(directory / "tokenizer.json", text_vocab, WORDS)
    return directory


@pytest.fixture(scope="module")
def source() -> MolmoeArchBackend:
    torch.set_num_threads(1)
    return MolmoeArchBackend(size="tiny", device="cpu", seed=3)


@pytest.fixture(scope="module")
def exported(source: MolmoeArchBackend) -> dict[str, torch.Tensor]:
    return export_release_tensors(source)


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory: pytest.TempPathFactory, source: MolmoeArchBackend) -> Path:
    """The tiny backend as a sharded release directory (index + shards), with its tokenizer."""
    directory = write_release_checkpoint(source, tmp_path_factory.mktemp("molmoe") / "MolmoE-tiny", max_shard_bytes=400_000)
    write_word_level_tokenizer(directory / "tokenizer.json", source.dims.text_vocab, WORDS)
    return directory


@pytest.fixture(scope="module")
def loaded(release_dir: Path) -> MolmoeArchBackend:
    return load_molmoe_checkpoint(release_dir, device="cpu")


def _variant(tmp_path: Path, exported: dict[str, torch.Tensor], source: MolmoeArchBackend,
             edit_tensors=None, edit_config=None) -> Path:
    tensors, config = dict(exported), release_config_dict(source.dims)
    if edit_tensors:
        edit_tensors(tensors)
    if edit_config:
        edit_config(config)
    return write_checkpoint(tmp_path / "ckpt", tensors, config, source.dims.text_vocab)


def test_the_export_uses_the_release_names(exported: dict[str, torch.Tensor], source: MolmoeArchBackend) -> None:
    d = source.dims
    assert exported[LM + "blocks.0.att_proj.weight"].shape == (3 * d.d_model, d.d_model)
    assert exported[LM + "blocks.15.ffn.experts.mlp.w2"].shape == (d.num_experts * d.expert_intermediate, d.d_model)
    assert exported[LM + "wte.new_embedding"].shape == (d.extra_vocab, d.d_model)
    assert exported[VISION + "image_vit.patch_embedding.weight"].shape == (d.vit_hidden, d.patch_size ** 2 * 3)
    assert f"{VISION}image_vit.transformer.resblocks.{d.vit_depth - 1}.attention.wq.weight" in exported
    assert not any(name.startswith(("lm.", "vision.")) for name in exported)


def test_a_sharded_release_directory_loads_with_every_tensor_accounted_for(release_dir: Path,
                                                                            loaded: MolmoeArchBackend) -> None:
    plan = plan_checkpoint(release_dir)
    assert (release_dir / "model.safetensors.index.json").is_file() and len(list(release_dir.glob("model-*.safetensors"))) > 1
    mapped = {name for rule in weight_rules(plan.dims, plan.config.num_kv_heads) for name in rule.release}
    mapped.add(LM + "ff_out.weight")
    assert set(plan.tensors.shapes) == mapped | set(plan.unused)  # none left over
    assert not mapped & set(plan.unused)
    assert all(reason for reason in plan.unused.values())
    targets = {name for rule in weight_rules(plan.dims, plan.config.num_kv_heads) for name in rule.target}
    assert set(_target_parameters(loaded)) == targets | {"lm.lm_head.weight"} | set(TARGET_LEFT_AT_INIT)


def test_mapping_round_trip_gives_the_same_logits_and_greedy_answers(source: MolmoeArchBackend,
                                                                     loaded: MolmoeArchBackend) -> None:
    source.tokenizer, source.eos_token_id = loaded.tokenizer, loaded.eos_token_id  # the same prompt ids for both
    try:
        torch.manual_seed(0)
        pixels = torch.randn(3, 3, source.dims.image_size, source.dims.image_size)
        with torch.inference_mode():
            vision_a, vision_b = source.vision(pixels), loaded.vision(pixels)
            embeds = torch.cat([vision_a.reshape(1, -1, source.dims.d_model),
                                source.lm.get_input_embeddings()(torch.tensor([[3, 4, 5, 7]]))], dim=1)
            logits_a = source.lm(inputs_embeds=embeds).logits
            logits_b = loaded.lm(inputs_embeds=embeds).logits
        assert torch.equal(vision_a, vision_b)
        assert torch.equal(logits_a, logits_b)
        samples = synthetic_latency_samples([3, 9], [(120, 90), (60, 140)], n=3, max_new_tokens=6)
        space = source.space
        for sample, config in zip(samples, [space.full(), KnobConfig("low", 4, 8), KnobConfig("medium", 6, 12)]):
            a = source.answer(sample, config, force_output_tokens=6)
            b = loaded.answer(sample, config, force_output_tokens=6)
            assert (a.text, a.output_tokens, a.text_tokens) == (b.text, b.output_tokens, b.text_tokens)
            assert a.text  # decoded through the tokenizer
    finally:
        source.tokenizer, source.eos_token_id = None, source.dims.text_vocab - 1


def test_the_real_prompt_goes_through_the_tokenizer(loaded: MolmoeArchBackend) -> None:
    ids = loaded.tokenizer.prompt_ids("what color is the shape ?")
    assert ids == [0, 1, 3, 4, 5, 6, 7, 8, 2, 1]  # User : what color is the shape ? Assistant :
    assert loaded.eos_token_id == loaded.dims.text_vocab - 1
    assert loaded.tokenizer.special_token_ids["<im_patch>"] == loaded.dims.text_vocab + 2


def test_a_release_ff_out_without_extra_rows_never_emits_an_extra_token(tmp_path: Path, exported, source) -> None:
    text_vocab = source.dims.text_vocab

    def release_head(tensors: dict) -> None:
        head = tensors[LM + "ff_out.weight"].clone()
        head[text_vocab:] = 50.0  # would win every argmax if it were kept
        tensors[LM + "ff_out.weight"] = head[:text_vocab]

    backend = load_molmoe_checkpoint(_variant(tmp_path, exported, source, edit_tensors=release_head), device="cpu")
    sample = synthetic_latency_samples([4], [(80, 80)], n=1)[0]
    result = backend.answer(sample, source.space.full(), force_output_tokens=4)
    with torch.inference_mode():
        logits = backend.lm(inputs_embeds=torch.zeros(1, 2, source.dims.d_model) + 0.1).logits
    assert logits[0, -1].argmax() < text_vocab and result.output_tokens == 4


@pytest.mark.parametrize(
    "edit_tensors, edit_config, names",
    [
        (lambda t: t.__setitem__(LM + "blocks.3.attn_out.weight", torch.zeros(64, 32)), None,
         ["model.transformer.blocks.3.attn_out.weight", "(64, 32)"]),
        (lambda t: t.pop(LM + "blocks.5.k_norm.weight"), None, ["model.transformer.blocks.5.k_norm.weight", "missing"]),
        (lambda t: t.__setitem__(LM + "blocks.0.ff_proj.weight", torch.zeros(8, 64)), None,
         ["model.transformer.blocks.0.ff_proj.weight", "unknown"]),
        (None, lambda c: c.update(model_type="llama"), ["model_type", "llama"]),
        (None, lambda c: c.update(moe_num_experts=0), ["moe_num_experts", "dense"]),
        (None, lambda c: c.update(n_layers=28), ["n_layers"]),
        (None, lambda c: c["vision_backbone"].update(image_mlp_activations="gelu"), ["image_mlp_activations"]),
        (None, lambda c: c.update(rope_theta=500000.0), ["rope_theta", "500000"]),
    ],
    ids=["wrong-shape", "missing-tensor", "unknown-tensor", "other-model-type", "dense-molmo", "other-depth", "other-vit",
         "other-rope"],
)
def test_another_architecture_is_refused_in_one_line(tmp_path: Path, exported, source, edit_tensors, edit_config,
                                                     names: list[str]) -> None:
    directory = _variant(tmp_path, exported, source, edit_tensors, edit_config)
    with pytest.raises(CheckpointError) as err:
        load_molmoe_checkpoint(directory, device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert all(name in message for name in names), message


def test_a_directory_without_weights_or_tokenizer_is_refused_naming_the_file(tmp_path: Path, exported, source) -> None:
    directory = _variant(tmp_path, exported, source)
    (directory / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_molmoe_checkpoint(directory, device="cpu")
    (directory / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        plan_checkpoint(directory)


def test_no_file_of_the_directory_is_executed(tmp_path: Path, exported, source) -> None:
    directory = _variant(tmp_path, exported, source, edit_config=lambda c: c.update(
        auto_map={"AutoModelForCausalLM": "modeling_molmoe.MolmoForCausalLM"}))
    (directory / "modeling_molmoe.py").write_text("raise SystemExit('remote code ran')\n")
    backend = load_molmoe_checkpoint(directory, device="cpu")
    assert backend.tokenizer is not None
