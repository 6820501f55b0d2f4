"""The embedded default base VLM: a small Molmo-style mixture-of-experts vision-language model.

    image --tiling (tier)--> global view + rows x cols tiles, each crop_px x crop_px
          --ViT (transformers ViTModel) per crop--> patch features --pool x pool concat--> tokens_per_crop
          --projector MLP + crop-layout embedding--> vision tokens
    [BOS] vision tokens  question words  [ANS]  --OLMoE decoder (OlmoeForCausalLM, inputs_embeds)-->  answer words [EOS]

The three knobs are applied per request by `apply_knobs` (a context manager that restores the model
exactly): the tier caps the number of tiles, `top_k` and the block subset go to the decoder through
`core.vlm.knob_application.decoder_knobs` (shared with `molmoe_arch`, which says how each is applied).

Experts run through transformers' "eager" experts implementation: a loop over the experts that
received tokens. At batch 1 a decode step reaches exactly top_k experts, so top_k sets the number of
expert matmuls per block; in prefill every expert is usually hit and top_k scales their rows.
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import OlmoeConfig, OlmoeForCausalLM, PreTrainedTokenizerFast, ViTConfig, ViTModel
from transformers.cache_utils import DynamicCache

from core.knobs import BASE_VLM_SPACE, TIERS, KnobConfig, KnobSpace, active_blocks, default_drop_order
from core.timing import StageClock
from core.vlm.backend import GenerationResult, RequestFeatures
from core.vlm.knob_application import cut_tiles, decoder_knobs, select_grid
from core.vqa.sample import VQASample
from core.vlm.tokenizer import ANSWER, build_word_tokenizer, load_word_tokenizer

CONFIG_FILE = "base_vlm_config.json"
WEIGHTS_FILE = "model.safetensors"
# The measured block drop order ({"drop_order": [...]}, as the importance experiment writes it), when
# a checkpoint carries one: every backend loaded from that directory then drops blocks in that order.
DROP_ORDER_FILE = "drop_order.json"


@dataclass
class BaseVLMConfig:
    """Architecture of the base VLM (defaults = the shipped model)."""

    crop_px: int = 32
    patch_px: int = 8
    pool: int = 2  # pool x pool patches are concatenated into one vision token (Molmo pools 2x2)
    vision_dim: int = 96
    vision_layers: int = 3
    vision_heads: int = 4
    vision_mlp_dim: int = 192
    d_model: int = 96
    num_blocks: int = 8
    num_heads: int = 4
    num_experts: int = 8
    expert_dim: int = 96
    default_top_k: int = 6  # the full config's experts per token (MoE routing keeps the top-k gate weights as they are)
    vocab_size: int = 128
    max_positions: int = 512
    experts_implementation: str = "eager"
    router_aux_loss_coef: float = 0.01
    # Training bonus on the router's per-token entropy (mean over tokens and active blocks). MolmoE
    # routes 8 of 64 experts and its kept gate weights sum to well under 1, so each expert fewer takes
    # a share of the MoE output away; with 8 experts and top-6 the router here learns peaked gates
    # (top-1 holds nearly all the weight) and top_k cost nothing. Keeping the gates spread restores the
    # cost. 0 disables it (the committed checkpoints before this field were trained without).
    router_entropy_coef: float = 0.0
    init_std: float = 0.02  # weight init of vision tower and decoder
    # OLMoE RMS-normalises queries and keys, which caps attention logits at about
    # qk_norm_init**2 * sqrt(head_dim); with small heads that is too flat to pick one vision token out of
    # a hundred until the norm weights have grown, so they start larger.
    qk_norm_init: float = 1.0
    # Convolutional stem (3x3 conv, ReLU, 2x2 max-pool per halving of patch_px) instead of ViT's linear
    # patch projection, as in hybrid ViTs: trained from scratch on a few thousand images, a plain ViT
    # did not learn to read the suite's glyphs within a CPU budget (chance after 400 steps of a
    # word-reading probe) while the same ViT with this stem read 91% of held-out words.
    conv_stem_channels: tuple[int, ...] = (32, 64)
    # ViT's final LayerNorm slowed that probe's early learning; the decoder normalises its inputs anyway.
    vision_final_norm: bool = False
    # Where a token looks must survive into the decoder's values (left/right questions): the projected
    # tokens are layer-normalised and get a crop-layout and a within-crop cell embedding of comparable
    # scale. With unnormalised features and a small crop embedding, left/right stayed at chance.
    vision_token_norm: bool = True
    position_init_std: float = 0.5
    tier_max_crops: dict[str, int] = field(default_factory=lambda: dict(BASE_VLM_SPACE.tier_max_crops))

    @property
    def tokens_per_crop(self) -> int:
        side = self.crop_px // self.patch_px
        return (side // self.pool) ** 2

    @property
    def max_tiles(self) -> int:
        return max(self.tier_max_crops.values())


# --- image tiling --------------------------------------------------------------------------------

def _to_tensor(image: Image.Image) -> torch.Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


def image_to_crops(image: Image.Image, max_crops: int, crop_px: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Global view + tiles of `image`: a (1 + rows*cols, 3, crop_px, crop_px) tensor in [-1, 1] and the grid.

    The global view is the whole image letterboxed into one crop; the tiles cut the image resized to
    (cols*crop_px, rows*crop_px) into a row-major grid.
    """
    rows, cols = select_grid(image.width, image.height, max_crops)  # no floor: see tier_crop_band
    scale = crop_px / max(image.width, image.height)
    gw, gh = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    glob = torch.zeros(3, crop_px, crop_px)  # 0 = mid-grey after normalisation
    top, left = (crop_px - gh) // 2, (crop_px - gw) // 2
    glob[:, top : top + gh, left : left + gw] = _to_tensor(image.resize((gw, gh), Image.BILINEAR))
    tiles = cut_tiles(_to_tensor(image.resize((cols * crop_px, rows * crop_px), Image.BILINEAR)), rows, cols, crop_px)
    return torch.cat([glob[None], tiles]), (rows, cols)


def token_boxes(image_size: tuple[int, int], grid: tuple[int, int], config: BaseVLMConfig) -> torch.Tensor:
    """Image-pixel box (x0, y0, x1, y1) seen by every vision token of `image_to_crops`' output, in the
    order `encode_crops` emits them: (n_crops * tokens_per_crop, 4). Letterbox padding maps to boxes
    outside the image (zero overlap with anything drawn)."""
    width, height = image_size
    c = config.crop_px
    t = config.patch_px * config.pool  # crop pixels per token side
    side = c // t
    jj, ii = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy")
    cell = torch.stack([jj * t, ii * t, (jj + 1) * t, (ii + 1) * t], dim=-1).reshape(-1, 4).float()
    scale = c / max(width, height)
    gw, gh = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = (c - gw) // 2, (c - gh) // 2
    glob = (cell - torch.tensor([left, top, left, top])) * torch.tensor([width / gw, height / gh] * 2)
    rows, cols = grid
    sx, sy = cols * c / width, rows * c / height
    tiles = [
        (cell + torch.tensor([col * c, row * c] * 2)) / torch.tensor([sx, sy, sx, sy])
        for row in range(rows)
        for col in range(cols)
    ]
    return torch.cat([glob, *tiles])


class _ConvStem(nn.Sequential):
    """Drop-in for ViTPatchEmbeddings.projection (ViTModel reads `projection.weight.dtype`)."""

    @property
    def weight(self) -> torch.Tensor:
        return self[0].weight


def conv_stem(channels: Sequence[int], out_dim: int, patch_px: int) -> nn.Sequential:
    """RGB crop -> (out_dim, crop/patch_px, crop/patch_px): one conv-ReLU-maxpool stage per halving of
    `patch_px` (a power of two), widths `channels` then `out_dim`."""
    steps = int(math.log2(patch_px))
    if 2**steps != patch_px or len(channels) != steps - 1:
        raise ValueError(f"conv stem for patch {patch_px} needs {steps - 1} hidden widths, got {list(channels)}")
    widths = [3, *channels, out_dim]
    layers: list[nn.Module] = []
    for i in range(steps):
        layers += [nn.Conv2d(widths[i], widths[i + 1], kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
    return _ConvStem(*layers)


def _layout_slots(max_tiles: int) -> dict[tuple[int, int], int]:
    """First embedding slot of every grid (slot 0 is the global view)."""
    slots, offset = {}, 1
    for r in range(1, max_tiles + 1):
        for c in range(1, max_tiles // r + 1):
            slots[(r, c)] = offset
            offset += r * c
    return slots


# --- the model -----------------------------------------------------------------------------------

class LossParts(NamedTuple):
    """Training losses of one batch; `total` is what is back-propagated."""

    total: torch.Tensor
    answer_ce: torch.Tensor
    router_aux: torch.Tensor
    vision_aux: torch.Tensor
    router_entropy: torch.Tensor  # mean per-token router entropy in nats (logged; a bonus when coef > 0)


def router_entropy(router_logits: Sequence[torch.Tensor] | None, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the routers' softmax over the real tokens of `attention_mask` (B, L),
    averaged over the blocks that ran; each block's logits are (B * L, num_experts)."""
    if not router_logits:
        return torch.zeros((), device=attention_mask.device)
    keep = attention_mask.reshape(-1).bool()
    per_block = []
    for logits in router_logits:
        logp = F.log_softmax(logits.float()[keep], dim=-1)
        per_block.append(-(logp.exp() * logp).sum(-1).mean())
    return torch.stack(per_block).mean()


class BaseVLM(nn.Module):
    """Vision tower + projector + OLMoE decoder, with its tokenizer."""

    def __init__(self, config: BaseVLMConfig, tokenizer: PreTrainedTokenizerFast) -> None:
        super().__init__()
        if len(tokenizer) > config.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens > vocab_size {config.vocab_size}")
        self.config = config
        self.tokenizer = tokenizer
        self.answer_token_id = int(tokenizer.convert_tokens_to_ids(ANSWER))
        self.vision = ViTModel(
            ViTConfig(
                image_size=config.crop_px,
                patch_size=config.patch_px,
                hidden_size=config.vision_dim,
                num_hidden_layers=config.vision_layers,
                num_attention_heads=config.vision_heads,
                intermediate_size=config.vision_mlp_dim,
                layer_norm_eps=1e-6,
                initializer_range=config.init_std,
                attn_implementation="sdpa",
            ),
            add_pooling_layer=False,
        )
        if config.conv_stem_channels:
            self.vision.embeddings.patch_embeddings.projection = conv_stem(
                config.conv_stem_channels, config.vision_dim, config.patch_px
            )
        if not config.vision_final_norm:
            self.vision.layernorm = nn.Identity()
        self.projector = nn.Sequential(
            nn.Linear(config.pool * config.pool * config.vision_dim, config.d_model),
            nn.GELU(),
            nn.Linear(config.d_model, config.d_model),
        )
        self.token_norm = nn.LayerNorm(config.d_model) if config.vision_token_norm else nn.Identity()
        self._slots = _layout_slots(config.max_tiles)
        self.layout_embed = nn.Embedding(1 + sum(r * c for r, c in self._slots), config.d_model)
        self.cell_embed = nn.Embedding(config.tokens_per_crop, config.d_model)
        nn.init.normal_(self.layout_embed.weight, std=config.position_init_std)
        nn.init.normal_(self.cell_embed.weight, std=config.position_init_std)
        self.decoder = OlmoeForCausalLM(
            OlmoeConfig(
                vocab_size=config.vocab_size,
                hidden_size=config.d_model,
                intermediate_size=config.expert_dim,
                num_hidden_layers=config.num_blocks,
                num_attention_heads=config.num_heads,
                num_key_value_heads=config.num_heads,
                max_position_embeddings=config.max_positions,
                num_experts=config.num_experts,
                num_experts_per_tok=config.default_top_k,
                norm_topk_prob=False,
                router_aux_loss_coef=config.router_aux_loss_coef,
                initializer_range=config.init_std,
                pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                tie_word_embeddings=False,
                attn_implementation="sdpa",
                experts_implementation=config.experts_implementation,
            )
        )
        with torch.no_grad():
            for layer in self.decoder.model.layers:
                layer.self_attn.q_norm.weight.fill_(config.qk_norm_init)
                layer.self_attn.k_norm.weight.fill_(config.qk_norm_init)
        self.max_crops = config.max_tiles  # set per request by apply_knobs (tier)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def parameter_mib(self) -> float:
        """Size of the weights in MiB (the checkpoint's safetensors, give or take the header)."""
        return sum(p.numel() * p.element_size() for p in self.parameters()) / 2**20

    # --- vision -------------------------------------------------------------------------------
    def layout_ids(self, grid: tuple[int, int]) -> torch.Tensor:
        """Layout-embedding ids of the global view and the tiles of `grid`, in crop order."""
        first = self._slots[grid]
        return torch.tensor([0] + list(range(first, first + grid[0] * grid[1])), dtype=torch.long)

    def encode_crops(self, crops: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(B, n_crops, 3, C, C) crops of one grid -> (B, n_crops * tokens_per_crop, d_model) vision tokens."""
        return self.encode_views(crops, self.layout_ids(grid))

    def encode_views(self, crops: torch.Tensor, layout_ids: torch.Tensor) -> torch.Tensor:
        """`encode_crops` for any subset of a grid's crops: (B, n, 3, C, C) crops and their (n,) layout ids.

        Each crop is encoded on its own, so the global view (layout id 0, the same crop at every tier)
        encoded once and the tier's tiles encoded later concatenate to exactly `encode_crops`' tokens.
        """
        b, n = crops.shape[:2]
        cfg = self.config
        feats = self.vision(pixel_values=crops.reshape(b * n, 3, cfg.crop_px, cfg.crop_px)).last_hidden_state[:, 1:]
        side = cfg.crop_px // cfg.patch_px
        p = cfg.pool
        # Concatenate each p x p neighbourhood of patches into one token (Molmo pools 2x2 patches).
        feats = feats.reshape(b * n, side // p, p, side // p, p, cfg.vision_dim).permute(0, 1, 3, 2, 4, 5)
        tokens = self.token_norm(self.projector(feats.reshape(b * n, cfg.tokens_per_crop, p * p * cfg.vision_dim)))
        layout = self.layout_embed(layout_ids.to(crops.device))  # (n, d)
        cells = self.cell_embed.weight  # (tokens_per_crop, d), row-major within the crop
        tokens = tokens.reshape(b, n, cfg.tokens_per_crop, cfg.d_model) + layout[None, :, None, :] + cells[None, None]
        return tokens.reshape(b, n * cfg.tokens_per_crop, cfg.d_model)

    def preprocess(self, image: Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        """Crops of `image` at the active tier (`self.max_crops`)."""
        return image_to_crops(image, self.max_crops, self.config.crop_px)

    # --- text ---------------------------------------------------------------------------------
    def question_ids(self, question: str) -> list[int]:
        """Word ids of the question."""
        return list(self.tokenizer(question, add_special_tokens=False)["input_ids"])

    def answer_ids(self, answer: str) -> list[int]:
        """Word ids of the answer followed by EOS (the training targets)."""
        return list(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + [self.tokenizer.eos_token_id]

    def prompt_embeds(self, vision_tokens: torch.Tensor, question_ids: torch.Tensor) -> torch.Tensor:
        """Prompt embeddings [BOS] vision tokens, question words, [ANS] (Molmo's order: image first).

        vision_tokens: (B, V, d); question_ids: (B, Q), equal lengths (no padding). Returns (B, 1+V+Q+1, d).
        """
        b, dev = question_ids.shape[0], question_ids.device
        bos = torch.full((b, 1), self.tokenizer.bos_token_id, dtype=torch.long, device=dev)
        ans = torch.full((b, 1), self.answer_token_id, dtype=torch.long, device=dev)
        embed = self.decoder.model.embed_tokens
        return torch.cat([embed(bos), vision_tokens, embed(torch.cat([question_ids, ans], dim=1))], dim=1)

    def _single_prompt(self, vision_tokens: torch.Tensor, question: str) -> tuple[torch.Tensor, int]:
        ids = self.question_ids(question)
        q = torch.tensor([ids], dtype=torch.long, device=vision_tokens.device)
        return self.prompt_embeds(vision_tokens, q), len(ids) + 2  # text tokens: BOS, question, ANS

    def dialogue_ids(self, qa_pairs: Sequence[tuple[str, str]]) -> tuple[list[int], list[bool]]:
        """Text after the vision tokens for training: question [ANS] answer [EOS], once per pair, and
        which positions are targets (answer words and EOS). The first pair alone is exactly what
        inference sees after the image."""
        ids: list[int] = []
        targets: list[bool] = []
        for question, answer in qa_pairs:
            q = self.question_ids(question) + [self.answer_token_id]
            a = self.answer_ids(answer)
            ids += q + a
            targets += [False] * len(q) + [True] * len(a)
        return ids, targets

    # --- training forward ---------------------------------------------------------------------
    def teacher_forced_loss(
        self,
        crops: torch.Tensor,
        grid: tuple[int, int],
        text_ids: torch.Tensor,
        target_mask: torch.Tensor,
        vision_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
        vision_loss_weight: float = 0.0,
    ) -> LossParts:
        """Batched teacher-forced forward over [BOS] vision tokens text_ids.

        crops: (B, n_crops, 3, C, C) of one grid; text_ids: (B, T) from `dialogue_ids`, right-padded
        with PAD; target_mask: (B, T) true at answer words and EOS. The answer loss is their
        cross-entropy; the router adds its load-balancing loss. `vision_loss` maps the vision tokens
        (B, n_vision_tokens, d_model) to an auxiliary loss added with `vision_loss_weight` (training
        uses the dense region reader of `core.vlm.region_reader`, so the vision tower keeps a dense signal
        instead of one answer word per image).
        """
        vision = self.encode_crops(crops, grid)
        b, dev = text_ids.shape[0], text_ids.device
        embed = self.decoder.model.embed_tokens
        bos = embed(torch.full((b, 1), self.tokenizer.bos_token_id, dtype=torch.long, device=dev))
        embeds = torch.cat([bos, vision, embed(text_ids)], dim=1)
        pad = (text_ids != self.tokenizer.pad_token_id).long()
        attention_mask = torch.cat([torch.ones((b, 1 + vision.shape[1]), dtype=torch.long, device=dev), pad], dim=1)
        t = text_ids.shape[1]
        out = self.decoder(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            use_cache=False,
            output_router_logits=True,
            logits_to_keep=t + 1,  # the last vision token predicts text token 0, text token i predicts i + 1
        )
        logits = out.logits[:, :-1]
        target = target_mask.bool()
        ce = F.cross_entropy(logits[target], text_ids[target])
        aux = out.aux_loss if out.aux_loss is not None else torch.zeros((), device=ce.device)
        entropy = router_entropy(out.router_logits, attention_mask)
        vision_aux = torch.zeros((), device=ce.device)
        if vision_loss is not None and vision_loss_weight > 0:
            vision_aux = vision_loss(vision)
        total = (ce + self.config.router_aux_loss_coef * aux + vision_loss_weight * vision_aux
                 - self.config.router_entropy_coef * entropy)
        return LossParts(total, ce, aux, vision_aux, entropy)

    @torch.no_grad()
    def prompt_logits(self, image: Image.Image, question: str) -> torch.Tensor:
        """Next-token logits after the prompt (vocab,), under the knobs currently applied."""
        crops, grid = self.preprocess(image)
        embeds, _ = self._single_prompt(self.encode_crops(crops[None].to(self.device), grid), question)
        return self.decoder(inputs_embeds=embeds, use_cache=False, logits_to_keep=1).logits[0, -1]

    # --- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        image: Image.Image,
        question: str,
        max_new_tokens: int,
        force_output_tokens: int | None = None,
        clock: StageClock | None = None,
    ) -> tuple[list[int], int, int]:
        """Greedy decoding with a KV cache under the applied knobs.

        Stops after EOS (which counts as an output token) or `max_new_tokens`; with
        `force_output_tokens` it runs exactly that many tokens. Stages go to `clock`: "vision"
        (tiling + ViT + projector), "prefill" (prompt through the decoder, first token), and one
        "decode" interval per further token. Returns (generated ids, crops, text tokens).
        """
        clock = clock or StageClock(self.device)
        limit = force_output_tokens if force_output_tokens is not None else max_new_tokens
        if limit < 1:
            raise ValueError(f"need at least one output token, got {limit}")
        with clock.stage("vision"):
            crops, grid = self.preprocess(image)
            vision_tokens = self.encode_crops(crops[None].to(self.device), grid)
        generated, text_tokens = self.generate_from_vision(vision_tokens, question, limit, force_output_tokens, clock)
        return generated, crops.shape[0] - 1, text_tokens

    @torch.no_grad()
    def generate_from_vision(
        self,
        vision_tokens: torch.Tensor,
        question: str,
        limit: int,
        force_output_tokens: int | None = None,
        clock: StageClock | None = None,
    ) -> tuple[list[int], int]:
        """`generate` after the vision stage: prefill and decode from (1, V, d) vision tokens under the
        applied decoder knobs (adaptive inference picks top_k and blocks once the vision stage is
        measured). Returns (generated ids, text tokens)."""
        clock = clock or StageClock(self.device)
        eos = self.tokenizer.eos_token_id
        if limit < 1:
            raise ValueError(f"need at least one output token, got {limit}")
        with clock.stage("prefill"):
            embeds, text_tokens = self._single_prompt(vision_tokens, question)
            cache = DynamicCache(config=self.decoder.config)
            out = self.decoder(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = int(out.logits[0, -1].argmax())
        generated = [token]
        while len(generated) < limit and (force_output_tokens is not None or token != eos):
            with clock.stage("decode"):
                step = torch.tensor([[token]], device=self.device)
                out = self.decoder(input_ids=step, past_key_values=cache, use_cache=True, logits_to_keep=1)
                token = int(out.logits[0, -1].argmax())
            generated.append(token)
        return generated, text_tokens

    @torch.no_grad()
    def generate_batch(self, samples: Sequence[VQASample], max_batch: int = 64) -> list[str]:
        """Greedy answers for many samples at once under the applied knobs (validation during training).

        Samples are grouped by crop grid and question length so no group needs padding; each answer
        stops at EOS or its own max_new_tokens, as `generate` does.
        """
        eos = self.tokenizer.eos_token_id
        groups: dict[tuple, list] = {}
        for i, s in enumerate(samples):
            crops, grid = self.preprocess(s.image)
            q = self.question_ids(s.question)
            groups.setdefault((grid, len(q)), []).append((i, crops, q, s.max_new_tokens))
        answers = [""] * len(samples)
        for (grid, _), items in groups.items():
            for start in range(0, len(items), max_batch):
                chunk = items[start : start + max_batch]
                crops = torch.stack([c for _, c, _, _ in chunk]).to(self.device)
                q = torch.tensor([q for _, _, q, _ in chunk], device=self.device)
                embeds = self.prompt_embeds(self.encode_crops(crops, grid), q)
                cache = DynamicCache(config=self.decoder.config)
                out = self.decoder(inputs_embeds=embeds, past_key_values=cache, use_cache=True, logits_to_keep=1)
                tokens = out.logits[:, -1].argmax(-1)
                steps = [tokens]
                for _ in range(max(m for *_, m in chunk) - 1):
                    if bool((torch.stack(steps, 1) == eos).any(1).all()):
                        break
                    out = self.decoder(input_ids=tokens[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
                    tokens = out.logits[:, -1].argmax(-1)
                    steps.append(tokens)
                for (i, *_, m), seq in zip(chunk, torch.stack(steps, 1).tolist()):
                    seq = seq[:m]
                    answers[i] = self.decode(seq[: seq.index(eos)] if eos in seq else seq)
        return answers

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    # --- persistence --------------------------------------------------------------------------
    def save_pretrained(self, directory: Path | str) -> Path:
        """Write config JSON, safetensors weights and tokenizer.json into `directory` (created)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE))
        self.tokenizer.save_pretrained(str(directory))
        return directory

    @classmethod
    def load_pretrained(cls, directory: Path | str, device: torch.device | str = "cpu") -> "BaseVLM":
        """The model saved by `save_pretrained`, in eval mode on `device`."""
        directory = Path(directory)
        if not (directory / CONFIG_FILE).is_file():
            raise FileNotFoundError(f"no base VLM checkpoint in {directory} (missing {CONFIG_FILE})")
        fields = json.loads((directory / CONFIG_FILE).read_text())
        if "conv_stem_channels" in fields:
            fields["conv_stem_channels"] = tuple(fields["conv_stem_channels"])  # JSON has lists
        config = BaseVLMConfig(**fields)
        model = cls(config, load_word_tokenizer(directory))
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
        return model.to(device).eval()


def build_base_vlm(config: BaseVLMConfig | None = None, seed: int = 0) -> BaseVLM:
    """A freshly initialised base VLM with the suite's word tokenizer."""
    from core.vqa.suite import suite_vocabulary  # the tokenizer's words come from the suite

    config = config or BaseVLMConfig()
    torch.manual_seed(seed)
    return BaseVLM(config, build_word_tokenizer(suite_vocabulary()))


def space_for(config: BaseVLMConfig) -> KnobSpace:
    """BASE_VLM_SPACE when `config` has the shipped block/expert counts, else a space of the same shape
    scaled to `config` (tiny test models)."""
    s = BASE_VLM_SPACE
    if (config.num_blocks, config.num_experts, config.default_top_k, config.tokens_per_crop) == (
        s.num_blocks, s.num_experts, s.default_top_k, s.tokens_per_crop
    ) and config.tier_max_crops == s.tier_max_crops:
        return s
    nb, ne = config.num_blocks, config.num_experts
    blocks = tuple(sorted({max(2, round(nb * f)) for f in (0.5, 0.625, 0.75, 0.875, 1.0)}))
    if len(blocks) != 5:
        blocks = tuple(range(nb - 4, nb + 1))
    tops = tuple(sorted({max(1, min(ne, k)) for k in s.top_k_options}))
    if len(tops) != 5:
        tops = tuple(range(1, 6))
    return KnobSpace(
        name=f"base_vlm_b{nb}_e{ne}",
        tier_max_crops=dict(config.tier_max_crops),
        top_k_options=tops,
        block_options=blocks,
        num_blocks=nb,
        num_experts=ne,
        tokens_per_crop=config.tokens_per_crop,
        default_top_k=config.default_top_k if config.default_top_k in tops else tops[-1],
    )


# --- knob application ----------------------------------------------------------------------------

@contextmanager
def apply_knobs(
    model: BaseVLM, config: KnobConfig, space: KnobSpace, drop_order: Sequence[int] | None = None
) -> Iterator[tuple[int, ...]]:
    """Run `model` under `config` inside the block; yields the active block indices.

    Validates `config` against `space` first (KnobOutOfSpaceError), then sets the tier's crop cap and
    hands top_k and the active blocks to `decoder_knobs`. Everything is put back on exit, also when
    the block raises.
    """
    space.validate(config)
    keep = active_blocks(space.num_blocks, config.num_active_blocks, drop_order)
    saved_crops = model.max_crops
    try:
        model.max_crops = space.max_crops(config.tier)
        with decoder_knobs(model.decoder, config.top_k, keep):
            yield keep
    finally:
        model.max_crops = saved_crops


# --- the backend ---------------------------------------------------------------------------------

class BaseVLMBackend:
    """`core.vlm.backend.VLMBackend` over a trained BaseVLM (name "base_vlm")."""

    name = "base_vlm"

    def __init__(self, model: BaseVLM, space: KnobSpace | None = None, drop_order: Sequence[int] | None = None) -> None:
        self.model = model.eval()
        self.space = space or space_for(model.config)
        self.device = model.device
        self.drop_order = list(drop_order) if drop_order is not None else default_drop_order(self.space.num_blocks)

    @classmethod
    def from_pretrained(cls, directory: Path | str, device: torch.device | str = "cpu") -> "BaseVLMBackend":
        """Load a checkpoint directory written by `BaseVLM.save_pretrained`, with its measured drop
        order when the directory has a `drop_order.json` (else the default order)."""
        backend = cls(BaseVLM.load_pretrained(directory, device))
        order_file = Path(directory) / DROP_ORDER_FILE
        if order_file.is_file():
            data = json.loads(order_file.read_text())
            backend.set_drop_order(data["drop_order"] if isinstance(data, dict) else data)
        return backend

    def set_drop_order(self, drop_order: Sequence[int]) -> None:
        """Middle blocks in ascending importance (dropped first to last)."""
        active_blocks(self.space.num_blocks, self.space.block_options[-1], drop_order)  # validates the permutation
        self.drop_order = list(drop_order)

    def answer_log_likelihood(self, sample: VQASample, config: KnobConfig) -> float:
        """Mean log-probability per token (words and EOS) of the first reference answer under
        `config`, teacher-forced after the prompt; the model is restored afterwards."""
        with torch.inference_mode(), apply_knobs(self.model, config, self.space, self.drop_order):
            crops, grid = self.model.preprocess(sample.image)
            ids, targets = self.model.dialogue_ids([(sample.question, sample.answers[0])])
            parts = self.model.teacher_forced_loss(
                crops[None].to(self.device), grid, torch.tensor([ids], device=self.device),
                torch.tensor([targets], device=self.device),
            )
        return -float(parts.answer_ce)

    def answer_batch(self, samples: Sequence[VQASample], config: KnobConfig) -> list[str]:
        """Greedy answers of many samples under `config`, batched (`BaseVLM.generate_batch`: no padding,
        so the same words `answer` gives, to float rounding); untimed, for accuracy tables."""
        with torch.inference_mode(), apply_knobs(self.model, config, self.space, self.drop_order):
            return self.model.generate_batch(samples)

    def answer(
        self,
        sample: VQASample,
        config: KnobConfig,
        max_new_tokens: int | None = None,
        force_output_tokens: int | None = None,
    ) -> GenerationResult:
        """Greedy answer under `config`, timed per stage; the model is restored afterwards."""
        clock = StageClock(self.device)
        limit = max_new_tokens if max_new_tokens is not None else sample.max_new_tokens
        with torch.inference_mode(), apply_knobs(self.model, config, self.space, self.drop_order) as keep:
            ids, crops, text_tokens = self.model.generate(
                sample.image, sample.question, limit, force_output_tokens=force_output_tokens, clock=clock
            )
        ms = clock.durations_ms()
        eos = self.model.tokenizer.eos_token_id
        words = ids[: ids.index(eos)] if eos in ids and force_output_tokens is None else [i for i in ids if i != eos]
        decode_steps = ms.get("decode", [])
        return GenerationResult(
            text=self.model.decode(words),
            output_tokens=len(ids),
            crops=crops,
            vision_tokens=self.space.vision_tokens(crops),
            text_tokens=text_tokens,
            active_blocks=keep,
            T_vision_ms=sum(ms["vision"]),
            T_prefill_ms=sum(ms["prefill"]),
            T_decode_ms=float(sum(decode_steps)),
            decode_step_ms=decode_steps,
        )

    # --- stage by stage (core.vlm.backend.StagedVLM: adaptive inference) --------------------------
    def _at_tier(self, tier: str) -> KnobConfig:
        full = self.space.full()
        return KnobConfig(tier, full.top_k, full.num_active_blocks)

    @torch.inference_mode()
    def request_features(self, sample: VQASample) -> RequestFeatures:
        """Question embedding mean, the global view encoded alone (layout id 0), text tokens (BOS,
        words, ANS) and each tier's crops from the image size."""
        model = self.model
        ids = model.question_ids(sample.question)
        embed = model.decoder.model.embed_tokens
        question = embed(torch.tensor([ids], dtype=torch.long, device=model.device))[0].mean(0).float().cpu().numpy()
        with apply_knobs(model, self._at_tier(TIERS[0]), self.space, self.drop_order):
            crops, _ = model.preprocess(sample.image)
        global_view = model.encode_views(crops[None, :1].to(model.device), torch.zeros(1, dtype=torch.long))
        tiles = {t: int(np.prod(select_grid(sample.image.width, sample.image.height, self.space.max_crops(t))))
                 for t in TIERS}
        return RequestFeatures(question, global_view, len(ids) + 2, tiles)

    @torch.inference_mode()
    def encode_tier(self, sample: VQASample, tier: str, global_view: torch.Tensor) -> torch.Tensor:
        model = self.model
        with apply_knobs(model, self._at_tier(tier), self.space, self.drop_order):
            crops, grid = model.preprocess(sample.image)
            tiles = model.encode_views(crops[None, 1:].to(model.device), model.layout_ids(grid)[1:])
        return torch.cat([global_view, tiles], dim=1)

    @torch.inference_mode()
    def generate_from_vision(self, vision_tokens: torch.Tensor, sample: VQASample, config: KnobConfig,
                             max_new_tokens: int, clock: StageClock) -> list[int]:
        with apply_knobs(self.model, config, self.space, self.drop_order):
            generated, _ = self.model.generate_from_vision(vision_tokens, sample.question, max_new_tokens, clock=clock)
        return generated

    def decode_answer(self, ids: Sequence[int]) -> str:
        eos = self.model.tokenizer.eos_token_id
        return self.model.decode(list(ids[: list(ids).index(eos)]) if eos in ids else list(ids))
