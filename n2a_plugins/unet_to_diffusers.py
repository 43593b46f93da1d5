"""The `unet` denoiser as diffusers' `UNet2DModel` with the same weights.

The UNet is block for block UNet2DModel (see unet.py): DownBlock2D / AttnDownBlock2D per
level, UNetMidBlock2D, UpBlock2D / AttnUpBlock2D, sinusoidal time embedding with the sines
first (flip_sin_to_cos=False, freq_shift=0), ResNet blocks that add (or with scale_shift
scale and shift) the embedding. The condition joins the time embedding through n2a's
Linear-SiLU-Linear `cond_mlp`:

- class labels: the conditioner's embedding of each label through `cond_mlp` is a fixed
  vector per label, so the whole condition path folds into UNet2DModel's class-embedding
  table (`num_class_embeds` = labels + 1; the last row is "no condition", for guidance);
- a caption vector (MiniLM, pooled CLIP): UNet2DModel takes the projected vector as
  `class_labels` (class_embed_type "identity"), and `cond_mlp` ships as diffusers'
  `TimestepEmbedding(D, 4C)`, the module UNet2DConditionModel uses for its "projection"
  class embedding. (UNet2DConditionModel itself cannot host n2a's network: its
  UNetMidBlock2D has no attention.)
- token sequences (cross-attention) have no equivalent: n2a's cross-attention layer is
  not diffusers' Transformer2DModel.
"""

from __future__ import annotations

import torch
from torch import nn

from n2a_core import SpecError
from n2a_plugins.unet import Downsample, ResBlock, SelfAttention, Stage, UNet


def attention_head_dim(unet: UNet, widths: list[int], attention_levels: list[int], mid_attention: bool,
                       num_heads: int, head_channels: int | None) -> int:
    """UNet2DModel's one `attention_head_dim` (channels per head) for all attention layers."""
    if head_channels:
        return head_channels
    attn_widths = {widths[i] for i in attention_levels} | ({widths[-1]} if mid_attention else set())
    dims = {w // num_heads for w in attn_widths}
    if len(dims) > 1:
        raise SpecError(f"denoiser.num_heads: {num_heads} heads at widths {sorted(attn_widths)} give head sizes "
                        f"{sorted(dims)}; UNet2DModel has one attention_head_dim (set denoiser.head_channels)")
    return dims.pop() if dims else 8


def _linear(out: dict, src: nn.Module, dst: str) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = src.weight, src.bias


def _resblock(out: dict, src: ResBlock, dst: str) -> None:
    for a, b in (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj", "time_emb_proj"), ("norm2", "norm2"),
                 ("conv2", "conv2"), ("skip", "conv_shortcut")):
        module = getattr(src, a)
        if not isinstance(module, nn.Identity):
            _linear(out, module, f"{dst}.{b}")


def _attention(out: dict, src: SelfAttention, dst: str) -> None:
    _linear(out, src.norm, f"{dst}.group_norm")
    for name, w, b in zip(("to_q", "to_k", "to_v"), src.qkv.weight.chunk(3), src.qkv.bias.chunk(3), strict=True):
        out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = w, b
    _linear(out, src.proj, f"{dst}.to_out.0")


def _stages(out: dict, layers, dst: str) -> None:
    level = j = 0
    for layer in layers:
        if isinstance(layer, Downsample):
            _linear(out, layer.conv, f"{dst}.{level}.downsamplers.0.conv")
            level, j = level + 1, 0
            continue
        _stage(out, layer, f"{dst}.{level}", j)
        j += 1
        if layer.resample is not None:  # an Upsample closes an up level
            _linear(out, layer.resample.conv, f"{dst}.{level}.upsamplers.0.conv")
            level, j = level + 1, 0


def _stage(out: dict, stage: Stage, dst: str, j: int) -> None:
    if stage.xattn is not None:
        raise SpecError("denoiser.cond_mode: 'sequence' (cross-attention on tokens) has no UNet2DModel "
                        "equivalent; export a model with vector or class-label conditioning")
    _resblock(out, stage.res, f"{dst}.resnets.{j}")
    if stage.attn is not None:
        _attention(out, stage.attn, f"{dst}.attentions.{j}")


def to_unet2d(unet: UNet, sample_size: int, class_embeddings: torch.Tensor | None, *, base_channels: int,
              channel_mult: list[int], num_res_blocks: int, attention_levels: list[int], mid_attention: bool,
              num_heads: int, head_channels: int | None, dropout: float, norm_groups: int,
              scale_shift: bool) -> dict:
    from diffusers import UNet2DModel
    from diffusers.models.embeddings import TimestepEmbedding

    kind = unet.conditioning.kind
    if kind == "sequence":
        raise SpecError("denoiser.cond_mode: 'sequence' (cross-attention on tokens) has no UNet2DModel "
                        "equivalent; export a model with vector or class-label conditioning")
    widths = [base_channels * m for m in channel_mult]
    levels = range(len(widths))
    class_options = {}
    if kind == "vector":
        class_options = ({"num_class_embeds": len(class_embeddings) + 1} if class_embeddings is not None
                         else {"class_embed_type": "identity"})
    model = UNet2DModel(
        sample_size=sample_size, in_channels=unet.in_channels, out_channels=unet.out_channels,
        time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=0,
        down_block_types=[("AttnDownBlock2D" if i in attention_levels else "DownBlock2D") for i in levels],
        up_block_types=[("AttnUpBlock2D" if i in attention_levels else "UpBlock2D") for i in reversed(levels)],
        block_out_channels=widths, layers_per_block=num_res_blocks, mid_block_scale_factor=1, downsample_padding=1,
        dropout=dropout, act_fn="silu",
        attention_head_dim=attention_head_dim(unet, widths, attention_levels, mid_attention, num_heads,
                                              head_channels),
        norm_num_groups=norm_groups, attn_norm_num_groups=norm_groups, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift" if scale_shift else "default", add_attention=mid_attention,
        **class_options,
    )  # fmt: skip
    out: dict[str, torch.Tensor] = {}
    _linear(out, unet.time_mlp[0], "time_embedding.linear_1")
    _linear(out, unet.time_mlp[2], "time_embedding.linear_2")
    _linear(out, unet.conv_in, "conv_in")
    _stages(out, unet.down, "down_blocks")
    _stage(out, unet.mid, "mid_block", 0)
    _resblock(out, unet.mid_res, "mid_block.resnets.1")
    _stages(out, unet.up, "up_blocks")
    _linear(out, unet.norm_out, "conv_norm_out")
    _linear(out, unet.conv_out, "conv_out")
    projection = null = None
    if kind == "vector":
        with torch.no_grad():
            if class_embeddings is not None:  # labels + "no condition", through cond_mlp
                rows = torch.cat([class_embeddings.to(unet.null_cond), unet.null_cond[None]])
                out["class_embedding.weight"] = unet.cond_mlp(rows)
            else:
                projection = TimestepEmbedding(unet.conditioning.dim, unet.cond_mlp[0].out_features)
                projection.load_state_dict({"linear_1.weight": unet.cond_mlp[0].weight,
                                            "linear_1.bias": unet.cond_mlp[0].bias,
                                            "linear_2.weight": unet.cond_mlp[2].weight,
                                            "linear_2.bias": unet.cond_mlp[2].bias})
                null = unet.null_cond.detach().float().clone()
    model.load_state_dict({k: v.detach().float().clone() for k, v in out.items()}, strict=True)
    return {"unet": model.eval(), "condition_projection": projection, "null_condition": null}
