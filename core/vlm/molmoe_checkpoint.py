"""A local MolmoE-1B checkpoint (allenai `MolmoE-1B-0924`) loaded into the project's `molmoe_arch` modules.

The release directory holds `config.json`, `model.safetensors` or shards `model-0000N-of-0000M.safetensors`
with `model.safetensors.index.json`, and `tokenizer.json`; it also holds the authors' Python
(`modeling_molmoe.py`, `preprocessing_molmo.py`, ... named by `auto_map`), which is never imported, run
or read here: the config is read as JSON, the tensors with `safetensors` (no pickle), the tokenizer with
`tokenizers`. Every tensor of the checkpoint is either converted by the explicit mapping below or listed in
`UNUSED_RELEASE_TENSORS` with the reason; every shape is checked before any weight is copied; a checkpoint
of another architecture is refused by `CheckpointError`, one line naming the first mismatching field or
tensor.

Release names (prefix `model.`; the shapes are MolmoE-1B's, E = 64 experts, F = 1024 expert width):
  transformer.wte.embedding (50304, 2048), transformer.wte.new_embedding (128, 2048)
                                         -> lm.model.embed_tokens.weight, the two concatenated (ids >= 50304
                                            are the extra tokens: image markers)
  transformer.blocks.i.att_proj.weight (3*2048, 2048)   -> self_attn.q_proj / k_proj / v_proj (fused qkv, split)
  transformer.blocks.i.attn_out.weight                  -> self_attn.o_proj
  transformer.blocks.i.q_norm.weight, k_norm.weight     -> self_attn.q_norm, k_norm (RMS over the whole q / k)
  transformer.blocks.i.attn_norm.weight, ff_norm.weight -> input_layernorm, post_attention_layernorm
  transformer.blocks.i.ffn.router.layer.weight (E, 2048) -> mlp.gate.weight
  transformer.blocks.i.ffn.experts.mlp.w1 / v1 / w2 (E*F, 2048): megablocks' stacked experts, gate / up /
                                            down (w2 stored transposed, x @ w2) -> mlp.experts.gate_up_proj
                                            (E, 2F, 2048) = [w1_e; v1_e] and mlp.experts.down_proj (E, 2048, F)
  transformer.ln_f.weight                               -> model.norm
  transformer.ff_out.weight (50304, 2048)               -> lm_head (no logit for the extra tokens: those rows
                                            get a -inf bias, so greedy decoding never picks them, as in Molmo)
  vision_backbone.image_vit.patch_embedding.weight (1024, 14*14*3), a Linear over patches flattened
                                            (dh, dw, c) -> CLIP's Conv2d (1024, 3, 14, 14)
  vision_backbone.image_vit.class_embedding, positional_embedding (577, 1024), pre_ln.{weight,bias}
                                            -> vit.embeddings.class_embedding, position_embedding, pre_layrnorm
  vision_backbone.image_vit.transformer.resblocks.j.attention.w{q,k,v,o}.{weight,bias},
      attention_norm, ffn_norm, feed_forward.w1 / w2 -> vit.encoder.layers.j.self_attn.{q,k,v,out}_proj,
                                            layer_norm1, layer_norm2, mlp.fc1 / fc2
  vision_backbone.image_pooling_2d.w{q,k,v,o}.{weight,bias} (in 2*1024 for q/k/v) -> pool.q / k / v / out
  vision_backbone.image_projector.w1 / w2 / w3.weight -> projector.w1 / w2 / w3 (SwiGLU: w2(silu(w1 x) * w3 x))

Config fields read (flat `config.json`, `vision_backbone` nested): d_model, n_heads, n_kv_heads, n_layers,
moe_num_experts, moe_top_k, max_sequence_length, rope_theta, layer_norm_eps, vit_layers (-2, -9: indices
into the list of the ViT blocks' outputs), image_pooling_h/w (2), image_pooling_2d ("attention-meanq": the
window mean is the query), image_projector ("mlp"), and vision_backbone.image_default_input_size (336),
image_patch_size (14), image_emb_dim, image_num_heads, image_head_dim, image_mlp_dim,
image_mlp_activations ("quick_gelu"), image_num_layers, image_norm_eps. Checked to be MolmoE's: model_type
"molmo", moe_num_experts > 0 (a dense Molmo is refused), layer_norm_type "rms", attention_layer_norm (q/k
norms), no weight tying, no norm_after, no clip_qkv, half-split RoPE, no shared expert, no CLS feature.
Sizes the config leaves implicit (expert width, projector width, vocabulary rows) come from the tensor
shapes, each then checked against every other tensor's.

Preprocessing of the release (its `preprocessor_config.json` and `preprocessing_molmo.py`): CLIP mean
(0.48145466, 0.4578275, 0.40821073) and std (0.26862954, 0.26130258, 0.27577711), 336-px crops of 14-px
patches, 2x2 pooling to 12x12 = 144 tokens per crop, max_crops 12; the prompt is " User: {question}
Assistant:" (message_format "role", always_start_with_space) encoded without special tokens; OLMo's
tokenizer has no BOS and uses `<|endoftext|>` as EOS; the extra tokens are <im_start>, <im_end>, <im_patch>,
<im_col>, <|image|>. Still different here: the project's `molmoe_arch` tiling resizes each crop without
Molmo's padding and overlap margins and feeds [vision tokens; prompt] without the image-marker tokens and the
leading EOS-as-BOS, so a loaded checkpoint answers through the project's layout, not the authors' one.

Public sources read for these names, shapes and settings (as reference only; nothing copied or run):
  - github.com/ChulanZhang/molmo_hf: molmo/models/config_molmoe.py (ModelConfig, VisionBackboneConfig
    fields and defaults), molmo/models/modeling_molmoe.py (Embedding with embedding/new_embedding,
    att_proj/attn_out/attn_norm, q_norm/k_norm sizes, ViT resblocks/attention.w*/feed_forward/pre_ln,
    patch_embedding as a Linear, vit_layers indexing, image_pooling_2d with the mean query, image_projector
    w1/w2/w3), configs/tokenizer/preprocessor_config.json (mean, std, 336, 14, 12x12 tokens, max_crops 12).
  - The Molmo training code's olmo/nn/llm.py (e.g. github.com/tidalove/molmo2fish, a fork of allenai/molmo):
    OLMoEBlock with megablocks dMoE, `ffn.router.layer`, `ffn.experts.mlp.w1/v1/w2`.
  - huggingface/transformers' Molmo conversion script (convert_molmo_weights_to_hf.py): the `model.`-prefixed
    release keys (transformer.wte.embedding / new_embedding, transformer.ff_out, ln_f, vision_backbone.*,
    pad_embed) and the fused-qkv split without a RoPE permutation.
  - The Molmo release's preprocessing_molmo.py (as mirrored in public repositories): EXTRA_TOKENS, the "role"
    prompt " User: ... Assistant:", EOS used as BOS.
  - transformers' models/olmoe/modeling_olmoe.py (installed): OlmoeExperts' gate_up_proj / down_proj layout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from core.vlm.molmoe_arch import MolmoeArchBackend, MolmoeArchDims

RELEASE_MODEL_TYPE = "molmo"
LM = "model.transformer."
VISION = "model.vision_backbone."
EXTRA_TOKENS: tuple[str, ...] = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")
EOS_TOKEN = "<|endoftext|>"
PROMPT_TEMPLATE = " User: {question} Assistant:"
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Release tensors the project's modules deliberately do not use, by name suffix, with the reason.
UNUSED_RELEASE_TENSORS: dict[str, str] = {
    VISION + "pad_embed": "added by Molmo to the features of padded patches; the project's tiling resizes each "
                          "crop without padding, so no patch is padding",
}
UNUSED_VIT_BLOCK_REASON = "a ViT block after the last one the features come from (vit_layers): it never runs"
# Target parameters no release tensor sets, with the reason they may keep their initial values.
TARGET_LEFT_AT_INIT: dict[str, str] = {
    "vision.vit.post_layernorm.weight": "CLIP's post-layernorm acts on the pooled CLS output only; features come "
                                        "from hidden states",
    "vision.vit.post_layernorm.bias": "as post_layernorm.weight",
}


class CheckpointError(ValueError):
    """A checkpoint directory that is not a loadable MolmoE release: one line naming the file, field or tensor."""


# --- config ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _field(config: dict[str, Any], name: str, source: str, kind: type | tuple[type, ...] = int,
           default: Any = ..., expected: Any = ...) -> Any:
    """config[name], checked: present (or `default` when absent or null), of `kind`, equal to `expected`."""
    value = config.get(name)
    if value is None:
        if default is ...:
            raise CheckpointError(f"{source}: field {name} is missing")
        value = default
    wrong_kind = value is not None and not isinstance(value, kind)
    if wrong_kind or (isinstance(value, bool) and kind is int):
        raise CheckpointError(f"{source}: field {name}={value!r} is not a {getattr(kind, '__name__', kind)}")
    if expected is not ... and value != expected:
        raise CheckpointError(f"{source}: field {name} is {value!r}, the MolmoE release has {expected!r}")
    return value


@dataclass(frozen=True)
class ReleaseConfig:
    """What `config.json` says about the architecture (sizes the config leaves implicit come from shapes)."""

    d_model: int
    num_heads: int
    num_kv_heads: int
    num_blocks: int
    num_experts: int
    top_k: int
    max_positions: int
    rope_theta: float
    norm_eps: float
    vit_layers: tuple[int, ...]
    pool_window: int
    image_size: int
    patch_size: int
    vit_hidden: int
    vit_heads: int
    vit_head_dim: int
    vit_intermediate: int
    vit_num_layers: int
    vit_norm_eps: float


def read_release_config(directory: Path) -> ReleaseConfig:
    """The architecture fields of `directory/config.json`, each checked; CheckpointError names the first bad one."""
    path = directory / "config.json"
    cfg = _read_json(path)
    src = str(path)
    _field(cfg, "model_type", src, str, expected=RELEASE_MODEL_TYPE)
    num_experts = _field(cfg, "moe_num_experts", src, int, default=0)
    if not num_experts:
        raise CheckpointError(f"{src}: field moe_num_experts is {num_experts!r}: a dense Molmo, not MolmoE")
    _field(cfg, "layer_norm_type", src, str, default="rms", expected="rms")  # OLMoE's RMSNorm
    _field(cfg, "attention_layer_norm", src, bool, default=True, expected=True)  # OLMoE's q/k norms
    _field(cfg, "weight_tying", src, bool, default=False, expected=False)
    _field(cfg, "norm_after", src, bool, default=False, expected=False)
    _field(cfg, "clip_qkv", src, (int, float), default=None, expected=None)
    _field(cfg, "moe_shared_expert", src, bool, default=False, expected=False)
    _field(cfg, "use_cls_feature", src, bool, default=False, expected=False)
    _field(cfg, "image_pooling_2d", src, str, default="attention-meanq", expected="attention-meanq")
    _field(cfg, "image_projector", src, str, default="mlp", expected="mlp")
    rope_impl = _field(cfg, "rope_impl", src, str, default="llama")
    if rope_impl in ("interleave", "cockatoo"):  # pairs rotated in place: q/k rows would need a permutation
        raise CheckpointError(f"{src}: field rope_impl is {rope_impl!r}; only half-split RoPE (OLMoE's) is mapped")
    d_model = _field(cfg, "d_model", src)
    num_heads = _field(cfg, "n_heads", src)
    vit_layers = _field(cfg, "vit_layers", src, list)
    pool_h = _field(cfg, "image_pooling_h", src, default=2)
    _field(cfg, "image_pooling_w", src, default=2, expected=pool_h)
    vb = _field(cfg, "vision_backbone", src, dict)
    vsrc = f"{src}: vision_backbone"
    _field(vb, "image_model_type", vsrc, str, default="openai", expected="openai")
    _field(vb, "image_mlp_activations", vsrc, str, default="quick_gelu", expected="quick_gelu")
    input_size = _field(vb, "image_default_input_size", vsrc, list, default=[336, 336])
    if len(input_size) != 2 or input_size[0] != input_size[1]:
        raise CheckpointError(f"{vsrc}: field image_default_input_size={input_size!r} is not a square crop")
    vit_heads = _field(vb, "image_num_heads", vsrc)
    _field(vb, "image_num_key_value_heads", vsrc, default=vit_heads, expected=vit_heads)
    if not vit_layers or not all(isinstance(i, int) and i < 0 for i in vit_layers):
        raise CheckpointError(f"{src}: field vit_layers={vit_layers!r}: expected negative ViT block indices")
    return ReleaseConfig(
        d_model=d_model, num_heads=num_heads, num_kv_heads=_field(cfg, "n_kv_heads", src, default=num_heads),
        num_blocks=_field(cfg, "n_layers", src), num_experts=num_experts, top_k=_field(cfg, "moe_top_k", src),
        max_positions=_field(cfg, "max_sequence_length", src, default=4096),
        rope_theta=float(_field(cfg, "rope_theta", src, (int, float), default=10000.0)),
        norm_eps=float(_field(cfg, "layer_norm_eps", src, (int, float), default=1e-5)),
        vit_layers=tuple(vit_layers), pool_window=pool_h, image_size=int(input_size[0]),
        patch_size=_field(vb, "image_patch_size", vsrc), vit_hidden=_field(vb, "image_emb_dim", vsrc),
        vit_heads=vit_heads, vit_head_dim=_field(vb, "image_head_dim", vsrc),
        vit_intermediate=_field(vb, "image_mlp_dim", vsrc), vit_num_layers=_field(vb, "image_num_layers", vsrc),
        vit_norm_eps=float(_field(vb, "image_norm_eps", vsrc, (int, float), default=1e-5)),
    )


# --- tensors on disk ---------------------------------------------------------------------------


@dataclass
class TensorFiles:
    """Where each tensor of a checkpoint lives (read through safetensors, lazily)."""

    shapes: dict[str, tuple[int, ...]]
    files: dict[str, Path]

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="pt", device="cpu") as handle:
            return handle.get_tensor(name)


def scan_tensors(directory: Path) -> TensorFiles:
    """Names and shapes of every tensor (index + shards, or one model.safetensors), headers only."""
    from safetensors import SafetensorError, safe_open

    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: field weight_map is missing or empty")
        shard_names = sorted(set(map(str, weight_map.values())))
    elif (directory / SINGLE_FILE).is_file():
        weight_map, shard_names = None, [SINGLE_FILE]
    else:
        raise CheckpointError(f"{directory}: neither {INDEX_FILE} nor {SINGLE_FILE} is there")
    shapes: dict[str, tuple[int, ...]] = {}
    files: dict[str, Path] = {}
    for shard in shard_names:
        path = directory / shard
        if not path.is_file():
            raise CheckpointError(f"{index}: shard {shard} is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name in handle.keys():
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
                    files[name] = path
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None
    if weight_map is not None:
        for name, shard in weight_map.items():
            if files.get(name) != directory / shard:
                raise CheckpointError(f"{index}: tensor {name} is not in its shard {shard}")
    return TensorFiles(shapes, files)


# --- the mapping -------------------------------------------------------------------------------


Convert = Callable[[list[torch.Tensor]], list[torch.Tensor]]


@dataclass(frozen=True)
class WeightRule:
    """Release tensors -> target parameters (`lm.` / `vision.` + state-dict name) and the way back."""

    release: tuple[str, ...]
    target: tuple[str, ...]
    to_target: Convert
    to_release: Convert


def _same(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return ts


def _rename(release: str, target: str) -> WeightRule:
    return WeightRule((release,), (target,), _same, _same)


def _split_rows(sizes: Sequence[int]) -> Convert:
    return lambda ts: list(torch.split(ts[0], list(sizes), dim=0))


def _cat_rows(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.cat(ts, dim=0)]


def _experts_to_target(num_experts: int) -> Convert:
    def convert(ts: list[torch.Tensor]) -> list[torch.Tensor]:
        w1, v1, w2 = (t.reshape(num_experts, -1, t.shape[-1]) for t in ts)  # (E, F, d) each
        return [torch.cat([w1, v1], dim=1), w2.transpose(1, 2)]  # gate_up (E, 2F, d), down (E, d, F)

    return convert


def _experts_to_release(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    gate_up, down = ts
    num_experts, two_f, d = gate_up.shape
    w1, v1 = gate_up.split(two_f // 2, dim=1)
    return [w1.reshape(-1, d), v1.reshape(-1, d), down.transpose(1, 2).reshape(-1, d)]


def _patches_to_conv(patch: int) -> Convert:
    # Molmo flattens a patch as (dh, dw, c); CLIP's conv weight is (out, c, kh, kw).
    return lambda ts: [ts[0].reshape(ts[0].shape[0], patch, patch, 3).permute(0, 3, 1, 2)]


def _conv_to_patches(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [ts[0].permute(0, 2, 3, 1).reshape(ts[0].shape[0], -1)]


def weight_rules(dims: MolmoeArchDims, num_kv_heads: int) -> list[WeightRule]:
    """The whole mapping for `dims` (every release tensor except `ff_out` and the unused ones)."""
    head_dim = dims.d_model // dims.num_heads
    qkv = (dims.d_model, num_kv_heads * head_dim, num_kv_heads * head_dim)
    rules = [
        WeightRule((LM + "wte.embedding", LM + "wte.new_embedding"), ("lm.model.embed_tokens.weight",),
                   _cat_rows, _split_rows((dims.text_vocab, dims.extra_vocab))),
        _rename(LM + "ln_f.weight", "lm.model.norm.weight"),
    ]
    for i in range(dims.num_blocks):
        src, dst = f"{LM}blocks.{i}.", f"lm.model.layers.{i}."
        rules += [
            WeightRule((src + "att_proj.weight",), tuple(f"{dst}self_attn.{p}_proj.weight" for p in "qkv"),
                       _split_rows(qkv), _cat_rows),
            _rename(src + "attn_out.weight", dst + "self_attn.o_proj.weight"),
            _rename(src + "q_norm.weight", dst + "self_attn.q_norm.weight"),
            _rename(src + "k_norm.weight", dst + "self_attn.k_norm.weight"),
            _rename(src + "attn_norm.weight", dst + "input_layernorm.weight"),
            _rename(src + "ff_norm.weight", dst + "post_attention_layernorm.weight"),
            _rename(src + "ffn.router.layer.weight", dst + "mlp.gate.weight"),
            WeightRule(tuple(src + f"ffn.experts.mlp.{w}" for w in ("w1", "v1", "w2")),
                       (dst + "mlp.experts.gate_up_proj", dst + "mlp.experts.down_proj"),
                       _experts_to_target(dims.num_experts), _experts_to_release),
        ]
    vit, dst = VISION + "image_vit.", "vision.vit."
    rules += [
        WeightRule((vit + "patch_embedding.weight",), (dst + "embeddings.patch_embedding.weight",),
                   _patches_to_conv(dims.patch_size), _conv_to_patches),
        _rename(vit + "class_embedding", dst + "embeddings.class_embedding"),
        _rename(vit + "positional_embedding", dst + "embeddings.position_embedding.weight"),
        _rename(vit + "pre_ln.weight", dst + "pre_layrnorm.weight"),
        _rename(vit + "pre_ln.bias", dst + "pre_layrnorm.bias"),
    ]
    block_names = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                   "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.out_proj",
                   "attention_norm": "layer_norm1", "ffn_norm": "layer_norm2",
                   "feed_forward.w1": "mlp.fc1", "feed_forward.w2": "mlp.fc2"}
    for j in range(dims.vit_layers_used):
        for release, target in block_names.items():
            for kind in ("weight", "bias"):
                rules.append(_rename(f"{vit}transformer.resblocks.{j}.{release}.{kind}",
                                     f"{dst}encoder.layers.{j}.{target}.{kind}"))
    for release, target in {"wq": "q", "wk": "k", "wv": "v", "wo": "out"}.items():
        for kind in ("weight", "bias"):
            rules.append(_rename(f"{VISION}image_pooling_2d.{release}.{kind}", f"vision.pool.{target}.{kind}"))
    for w in ("w1", "w2", "w3"):
        rules.append(_rename(f"{VISION}image_projector.{w}.weight", f"vision.projector.{w}.weight"))
    return rules


LM_HEAD_RELEASE = LM + "ff_out.weight"
LM_HEAD_TARGET = "lm.lm_head.weight"


def _target_parameters(backend: MolmoeArchBackend) -> dict[str, torch.Tensor]:
    """Every parameter the mapping can set, by `lm.` / `vision.` + state-dict name."""
    params = {f"lm.{n}": p for n, p in backend.lm.state_dict(keep_vars=True).items()}
    params.update({f"vision.{n}": p for n, p in backend.vision.state_dict(keep_vars=True).items()})
    return params


def expected_release_shapes(dims: MolmoeArchDims, num_kv_heads: int, vit_depth: int,
                            lm_head_rows: int) -> dict[str, tuple[int, ...]]:
    """The release name -> shape of every tensor a checkpoint of `dims` holds (the unused ones included)."""
    shapes: dict[str, tuple[int, ...]] = {}
    head_dim = dims.d_model // dims.num_heads
    d, e, f = dims.d_model, dims.num_experts, dims.expert_intermediate
    shapes[LM + "wte.embedding"] = (dims.text_vocab, d)
    shapes[LM + "wte.new_embedding"] = (dims.extra_vocab, d)
    shapes[LM + "ln_f.weight"] = (d,)
    shapes[LM_HEAD_RELEASE] = (lm_head_rows, d)
    for i in range(dims.num_blocks):
        b = f"{LM}blocks.{i}."
        shapes.update({b + "att_proj.weight": (d + 2 * num_kv_heads * head_dim, d), b + "attn_out.weight": (d, d),
                       b + "q_norm.weight": (d,), b + "k_norm.weight": (num_kv_heads * head_dim,),
                       b + "attn_norm.weight": (d,), b + "ff_norm.weight": (d,), b + "ffn.router.layer.weight": (e, d),
                       b + "ffn.experts.mlp.w1": (e * f, d), b + "ffn.experts.mlp.v1": (e * f, d),
                       b + "ffn.experts.mlp.w2": (e * f, d)})
    vit, h, p = VISION + "image_vit.", dims.vit_hidden, dims.patch_size
    side = dims.image_size // p
    shapes.update({vit + "patch_embedding.weight": (h, p * p * 3), vit + "class_embedding": (h,),
                   vit + "positional_embedding": (side * side + 1, h), vit + "pre_ln.weight": (h,),
                   vit + "pre_ln.bias": (h,)})
    for j in range(vit_depth):
        r = f"{vit}transformer.resblocks.{j}."
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo"):
            shapes.update({r + name + ".weight": (h, h), r + name + ".bias": (h,)})
        for name in ("attention_norm", "ffn_norm"):
            shapes.update({r + name + ".weight": (h,), r + name + ".bias": (h,)})
        shapes.update({r + "feed_forward.w1.weight": (dims.vit_intermediate, h), r + "feed_forward.w1.bias": (dims.vit_intermediate,),
                       r + "feed_forward.w2.weight": (h, dims.vit_intermediate), r + "feed_forward.w2.bias": (h,)})
    feat = h * len(dims.vit_feature_layers)
    pool = VISION + "image_pooling_2d."
    for name in ("wq", "wk", "wv"):
        shapes.update({pool + name + ".weight": (h, feat), pool + name + ".bias": (h,)})
    shapes.update({pool + "wo.weight": (dims.pool_dim, h), pool + "wo.bias": (dims.pool_dim,)})
    proj = VISION + "image_projector."
    shapes.update({proj + "w1.weight": (dims.projector_hidden, dims.pool_dim),
                   proj + "w3.weight": (dims.projector_hidden, dims.pool_dim),
                   proj + "w2.weight": (d, dims.projector_hidden)})
    shapes[VISION + "pad_embed"] = (2, feat)
    return shapes


def unused_release_tensors(dims: MolmoeArchDims, vit_depth: int) -> dict[str, str]:
    """Release tensor name -> why the project's modules do not use it."""
    unused = dict(UNUSED_RELEASE_TENSORS)
    for j in range(dims.vit_layers_used, vit_depth):
        prefix = f"{VISION}image_vit.transformer.resblocks.{j}."
        for name in ("attention.wq", "attention.wk", "attention.wv", "attention.wo", "attention_norm", "ffn_norm",
                     "feed_forward.w1", "feed_forward.w2"):
            for kind in ("weight", "bias"):
                unused[prefix + name + "." + kind] = UNUSED_VIT_BLOCK_REASON
    return unused


# --- the plan: everything checked before a weight is built ----------------------------------------


@dataclass
class CheckpointPlan:
    """A checked checkpoint: its dims, tensors and what maps where."""

    directory: Path
    config: ReleaseConfig
    dims: MolmoeArchDims
    tensors: TensorFiles
    lm_head_rows: int  # text_vocab (the release: no logits for the extra tokens) or the whole vocabulary
    unused: dict[str, str] = field(default_factory=dict)


def _shape(tensors: TensorFiles, name: str) -> tuple[int, ...]:
    if name not in tensors.shapes:
        raise CheckpointError(f"checkpoint: tensor {name} is missing")
    return tensors.shapes[name]


def plan_checkpoint(directory: str | Path) -> CheckpointPlan:
    """Read config.json and the tensor headers and check them against the MolmoE architecture, before any
    weight is built; CheckpointError names the first mismatching field or tensor."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"model_path {directory}: not a directory")
    config = read_release_config(directory)
    tensors = scan_tensors(directory)
    if config.d_model % config.num_heads:
        raise CheckpointError(f"{directory / 'config.json'}: field n_heads={config.num_heads} does not divide d_model")
    if config.vit_heads * config.vit_head_dim != config.vit_hidden:
        raise CheckpointError(f"{directory / 'config.json'}: vision_backbone image_num_heads x image_head_dim != image_emb_dim")
    # Sizes the config leaves implicit, from shapes (each then checked with every other tensor's shape).
    text_vocab = _shape(tensors, LM + "wte.embedding")[0]
    extra_vocab = _shape(tensors, LM + "wte.new_embedding")[0]
    expert_rows = _shape(tensors, f"{LM}blocks.0.ffn.experts.mlp.w1")[0]
    if expert_rows % config.num_experts:
        raise CheckpointError(f"checkpoint: tensor {LM}blocks.0.ffn.experts.mlp.w1 has {expert_rows} rows, "
                              f"not a multiple of moe_num_experts={config.num_experts}")
    projector_hidden = _shape(tensors, VISION + "image_projector.w1.weight")[0]
    pool_dim = _shape(tensors, VISION + "image_pooling_2d.wo.weight")[0]
    lm_head_rows = _shape(tensors, LM_HEAD_RELEASE)[0]
    if lm_head_rows not in (text_vocab, text_vocab + extra_vocab):
        raise CheckpointError(f"checkpoint: tensor {LM_HEAD_RELEASE} has {lm_head_rows} rows; expected {text_vocab} "
                              f"(wte.embedding) or {text_vocab + extra_vocab} (with wte.new_embedding)")
    used = max(config.vit_num_layers + f for f in config.vit_layers) + 1
    if used < 1 or used > config.vit_num_layers:
        raise CheckpointError(f"{directory / 'config.json'}: field vit_layers={list(config.vit_layers)} is outside "
                              f"the {config.vit_num_layers} ViT blocks")
    try:
        dims = MolmoeArchDims(
            image_size=config.image_size, patch_size=config.patch_size, vit_hidden=config.vit_hidden,
            vit_heads=config.vit_heads, vit_intermediate=config.vit_intermediate, vit_depth=config.vit_num_layers,
            vit_layers_used=used, vit_feature_layers=config.vit_layers, pool_window=config.pool_window,
            pool_dim=pool_dim, projector_hidden=projector_hidden, d_model=config.d_model, num_blocks=config.num_blocks,
            num_heads=config.num_heads, num_experts=config.num_experts, top_k=config.top_k,
            expert_intermediate=expert_rows // config.num_experts, text_vocab=text_vocab, extra_vocab=extra_vocab,
            max_positions=config.max_positions,
        )
    except TypeError as exc:  # pragma: no cover - a dims field renamed in molmoe_arch
        raise CheckpointError(f"molmoe_arch dims changed: {exc}") from None
    # molmoe_arch builds OLMoE's and CLIP's defaults for these; a release with others is another model.
    for name, value, built in (("rope_theta", config.rope_theta, 10000.0), ("layer_norm_eps", config.norm_eps, 1e-5),
                               ("vision_backbone.image_norm_eps", config.vit_norm_eps, 1e-5)):
        if not math.isclose(value, built, rel_tol=1e-9):
            raise CheckpointError(f"{directory / 'config.json'}: field {name} is {value}; molmoe_arch builds {built}")
    space = MolmoeArchBackend.space
    if dims.num_blocks != space.num_blocks:
        raise CheckpointError(f"{directory / 'config.json'}: field n_layers is {dims.num_blocks}; the knob space needs {space.num_blocks}")
    if dims.num_experts != space.num_experts:
        raise CheckpointError(f"{directory / 'config.json'}: field moe_num_experts is {dims.num_experts}; the knob space needs {space.num_experts}")
    expected = expected_release_shapes(dims, config.num_kv_heads, config.vit_num_layers, lm_head_rows)
    for name, shape in expected.items():
        if name not in tensors.shapes:
            raise CheckpointError(f"checkpoint: tensor {name} is missing")
        if tensors.shapes[name] != shape:
            raise CheckpointError(f"checkpoint: tensor {name} has shape {tensors.shapes[name]}, expected {shape}")
    for name in sorted(tensors.shapes):
        if name not in expected:
            raise CheckpointError(f"checkpoint: tensor {name} is not part of the MolmoE release (unknown extra tensor)")
    return CheckpointPlan(directory, config, dims, tensors, lm_head_rows, unused_release_tensors(dims, config.vit_num_layers))


# --- tokenizer ------------------------------------------------------------------------------------


class MolmoeTokenizer:
    """The release's `tokenizer.json` through `tokenizers` (no remote code): the prompt template and decoding."""

    def __init__(self, path: str | Path, vocab_size: int) -> None:
        from tokenizers import Tokenizer

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: file is missing (the release's tokenizer)")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises its own Exception type for a malformed file
            raise CheckpointError(f"{path}: not a tokenizers JSON file ({' '.join(str(exc).split())[:160]})") from None
        eos = self._tokenizer.token_to_id(EOS_TOKEN)
        if eos is None:
            raise CheckpointError(f"{path}: token {EOS_TOKEN} (OLMo's EOS) is missing")
        self.eos_token_id = int(eos)
        self.special_token_ids: dict[str, int] = {}
        for token in EXTRA_TOKENS:
            token_id = self._tokenizer.token_to_id(token)
            if token_id is None:
                raise CheckpointError(f"{path}: Molmo's special token {token} is missing")
            self.special_token_ids[token] = int(token_id)
        too_big = [t for t, i in {EOS_TOKEN: eos, **self.special_token_ids}.items() if i >= vocab_size]
        if too_big:
            raise CheckpointError(f"{path}: token {too_big[0]} has an id outside the model's {vocab_size} embeddings")
        self.path = path

    def prompt_ids(self, question: str) -> list[int]:
        """Ids of " User: {question} Assistant:" without special tokens (Molmo's "role" format)."""
        return list(self._tokenizer.encode(PROMPT_TEMPLATE.format(question=question), add_special_tokens=False).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True).strip()


# --- load and export --------------------------------------------------------------------------------


def _masked_lm_head(weight: torch.Tensor, vocab_size: int) -> nn.Linear:
    """lm_head for a release whose ff_out has no rows for the extra tokens: their logits are -inf-like."""
    rows, d = weight.shape
    head = nn.Linear(d, vocab_size, bias=True, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        head.weight.zero_()
        head.weight[:rows].copy_(weight)
        head.bias.zero_()
        head.bias[rows:] = torch.finfo(weight.dtype).min
    return head


def load_molmoe_checkpoint(directory: str | Path, device: str | torch.device | None = None,
                           engine: str = "eager", experts_implementation: str | None = None) -> MolmoeArchBackend:
    """A `molmoe_arch` backend with the weights and tokenizer of the release in `directory`.

    Checks everything first (`plan_checkpoint`, the tokenizer), then builds the modules at the checkpoint's
    dims and copies each converted tensor in, with its shape checked again against the target parameter.
    """
    plan = plan_checkpoint(directory)
    tokenizer = MolmoeTokenizer(plan.directory / "tokenizer.json", plan.dims.vocab_size)
    backend = MolmoeArchBackend(dims=plan.dims, device=device, engine=engine, experts_implementation=experts_implementation)
    backend.size = f"checkpoint:{plan.directory}"
    targets = _target_parameters(backend)
    assigned: set[str] = set()
    with torch.no_grad():
        for rule in weight_rules(plan.dims, plan.config.num_kv_heads):
            values = rule.to_target([plan.tensors.read(name) for name in rule.release])
            for name, value in zip(rule.target, values):
                param = targets[name]
                if tuple(value.shape) != tuple(param.shape):
                    raise CheckpointError(f"checkpoint: {rule.release[0]} converts to {tuple(value.shape)}, "
                                          f"{name} is {tuple(param.shape)}")
                param.copy_(value.to(param.dtype))
                assigned.add(name)
        head = plan.tensors.read(LM_HEAD_RELEASE).to(backend.device, backend.dtype)
        if plan.lm_head_rows == plan.dims.vocab_size:
            targets[LM_HEAD_TARGET].copy_(head)
        else:
            backend.lm.lm_head = _masked_lm_head(head, plan.dims.vocab_size)
        assigned.add(LM_HEAD_TARGET)
    left = sorted(set(targets) - assigned - set(TARGET_LEFT_AT_INIT))
    if left:  # the mapping and the modules drifted apart: a bug here, not the user's input
        raise RuntimeError(f"molmoe checkpoint mapping leaves {left[0]} (and {len(left) - 1} more) unset")
    backend.tokenizer = tokenizer
    backend.eos_token_id = tokenizer.eos_token_id
    return backend


def release_config_dict(dims: MolmoeArchDims, num_kv_heads: int | None = None) -> dict[str, Any]:
    """A `config.json` in the release's layout describing `dims` (for synthetic checkpoints)."""
    return {
        "model_type": RELEASE_MODEL_TYPE, "architectures": ["MolmoForCausalLM"], "layer_norm_type": "rms",
        "d_model": dims.d_model, "n_heads": dims.num_heads, "n_kv_heads": num_kv_heads or dims.num_heads,
        "n_layers": dims.num_blocks, "moe_num_experts": dims.num_experts, "moe_top_k": dims.top_k,
        "mlp_hidden_size": 2 * dims.expert_intermediate, "vocab_size": dims.text_vocab,
        "embedding_size": dims.text_vocab, "additional_vocab_size": dims.extra_vocab,
        "max_sequence_length": dims.max_positions, "rope_theta": 10000.0, "layer_norm_eps": 1e-5,
        "attention_layer_norm": True, "weight_tying": False, "norm_after": False, "clip_qkv": None,
        "vit_layers": list(dims.vit_feature_layers), "image_pooling_h": dims.pool_window,
        "image_pooling_w": dims.pool_window, "image_pooling_2d": "attention-meanq", "image_projector": "mlp",
        "vision_backbone": {
            "image_model_type": "openai", "image_default_input_size": [dims.image_size, dims.image_size],
            "image_patch_size": dims.patch_size, "image_emb_dim": dims.vit_hidden, "image_num_heads": dims.vit_heads,
            "image_num_key_value_heads": dims.vit_heads, "image_head_dim": dims.vit_hidden // dims.vit_heads,
            "image_mlp_dim": dims.vit_intermediate, "image_mlp_activations": "quick_gelu",
            "image_num_layers": dims.vit_depth, "image_norm_eps": 1e-5,
            "image_num_pos": (dims.image_size // dims.patch_size) ** 2 + 1,
        },
    }


def export_release_tensors(backend: MolmoeArchBackend, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The backend's weights under the release's names and layouts (the inverse of the mapping), on the CPU.

    ff_out keeps every row of lm_head (the release has none for the extra tokens), so loading the export
    back gives the same logits. The release tensors the modules do not hold (pad_embed, the ViT blocks after
    the last feature layer) are written as zeros: the loader lists them as unused."""
    targets = _target_parameters(backend)
    out: dict[str, torch.Tensor] = {}
    to = (lambda t: t.detach().to("cpu", dtype or t.dtype).contiguous())
    with torch.no_grad():
        for rule in weight_rules(backend.dims, backend.lm.config.num_key_value_heads):
            for name, value in zip(rule.release, rule.to_release([targets[n] for n in rule.target])):
                out[name] = to(value)
        out[LM_HEAD_RELEASE] = to(targets[LM_HEAD_TARGET])
    dims = backend.dims
    expected = expected_release_shapes(dims, backend.lm.config.num_key_value_heads, dims.vit_depth,
                                       dims.vocab_size)
    unused = unused_release_tensors(dims, dims.vit_depth)
    for name, shape in expected.items():
        if name not in out:
            assert name in unused, name  # the mapping covers every tensor the modules hold
            out[name] = torch.zeros(shape, dtype=dtype or backend.dtype)
    return out


def write_word_level_tokenizer(path: str | Path, text_vocab: int,
                               words: Sequence[str] = ("User", ":", "Assistant")) -> None:
    """A word-level `tokenizer.json` in OLMo's id layout, for synthetic release directories: `words` first,
    made-up words w<i> for the other ordinary ids, EOS the last of them, Molmo's extra tokens right after."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(words)}
    vocab.update({f"w{i}": i for i in range(len(words), text_vocab - 1)})
    vocab[EOS_TOKEN] = text_vocab - 1
    vocab.update({t: text_vocab + k for k, t in enumerate(EXTRA_TOKENS)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=f"w{len(words)}"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.add_special_tokens([EOS_TOKEN, *EXTRA_TOKENS])
    tokenizer.save(str(path))


def write_release_checkpoint(backend: MolmoeArchBackend, directory: str | Path, dtype: torch.dtype | None = None,
                             max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Write `backend` as a release-layout checkpoint directory: config.json, safetensors shards and their
    index (one model.safetensors when it fits one shard). The tokenizer.json is the caller's to add."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = export_release_tensors(backend, dtype)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name]
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(directory / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k, shard in enumerate(shards, start=1):
            file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map.update({name: file for name in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=1))
    config = release_config_dict(backend.dims, backend.lm.config.num_key_value_heads)
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    return directory


def is_release_checkpoint(path: str | Path) -> bool:
    """True for a directory that looks like a Molmo release (config.json with model_type 'molmo')."""
    config = Path(path) / "config.json"
    try:
        return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get("model_type") == RELEASE_MODEL_TYPE
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


__all__ = [
    "CheckpointError", "CheckpointPlan", "MolmoeTokenizer", "ReleaseConfig", "TARGET_LEFT_AT_INIT",
    "UNUSED_RELEASE_TENSORS", "WeightRule", "expected_release_shapes", "export_release_tensors",
    "is_release_checkpoint", "load_molmoe_checkpoint", "plan_checkpoint", "read_release_config",
    "release_config_dict", "weight_rules", "write_release_checkpoint",
]
