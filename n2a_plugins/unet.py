"""The `unet` denoiser: a DDPM/ADM-style UNet with self-attention and optional conditioning.

Layout (Ho et al. 2020, appendix B; Dhariwal & Nichol 2021, sec. 3): a 3x3 conv stem;
`len(channel_mult)` levels going down, each `num_res_blocks` ResNet blocks at
base_channels * channel_mult[i] channels followed by a stride-2 conv (except the last);
a middle ResBlock-Attention-ResBlock; and the mirror image going up with
`num_res_blocks + 1` blocks per level, each fed the matching down-path activation by
concatenation, and nearest-neighbour x2 + conv between levels. Level i works at
h / 2^i of the latent. Self-attention follows every block of the levels in
`attention_levels`. With the same channels, blocks and attention levels this is
block for block (and parameter for parameter) diffusers' UNet2DModel, without depending
on it, so the two can be benchmarked side by side.

Time: the sinusoidal embedding of "Attention is all you need" (sec. 3.5; the Noise2Art
paper's eq. 12) of width base_channels, then Linear-SiLU-Linear to 4 x base_channels.
Every ResNet block ADDS a linear projection of it to its feature map after the first
conv (as in DDPM), or with `scale_shift` uses it to scale and shift the normalised
features (ADM's adaptive GroupNorm).

Conditioning, the `cond` of `Denoiser.forward`:
- vector B x D: projected by Linear-SiLU-Linear to the time-embedding width and added to
  it (Noise2Art: "projected and joined to the time embedding");
- sequence B x L x D: the mean-pooled tokens join the time embedding the same way, and a
  cross-attention layer (Rombach et al. 2022, eq. 3: queries from the feature map, keys
  and values from the tokens) follows every self-attention layer.
The learned null embedding `null_cond` (D values) stands for "no condition" (classifier-
free guidance, Ho & Salimans 2022): it replaces the condition where `drop` is True and
for every sample when `cond` is None. It lives in the conditioner's output space, so it
takes the same projection path as a real condition, and as a sequence it is one token
(attention over L copies of one token equals attention over that token, so a dropped
B x L x D sample and cond=None agree).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveInt, model_validator
from torch import nn

from n2a_core import (
    BuildContext,
    ComponentSpec,
    Conditioning,
    Denoiser,
    PredictionType,
    SpecError,
    hookimpl,
    prefers_channels_last,
)

CondMode = Literal["none", "vector", "sequence"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """B timesteps -> B x dim: [sin(t w_0..w_{dim/2-1}), cos(t w_0..)], w_i = max_period^(-2i/dim).

    Vaswani et al. 2017 sec. 3.5 (Noise2Art eq. 12) with the sines and the cosines in two
    halves instead of interleaved (the MLP after it does not care). Always float32: t goes
    up to ~1000, where bf16 cannot tell t from t + 4.
    """
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    omega = torch.exp(i * (-2.0 * math.log(max_period) / dim))
    angle = t.float()[:, None] * omega[None, :]
    emb = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    return F.pad(emb, (0, dim % 2))  # an odd width gets a zero last column


def check_architecture(
    base_channels: int,
    channel_mult: list[int],
    attention_levels: list[int],
    mid_attention: bool,
    num_heads: int,
    head_channels: int | None,
    norm_groups: int,
) -> None:
    """Raise ValueError naming the field when the channel arithmetic does not work out."""
    widths = [base_channels * m for m in channel_mult]
    if any(w % norm_groups for w in [base_channels, *widths]):
        raise ValueError(
            f"norm_groups ({norm_groups}) must divide base_channels ({base_channels}) and every "
            f"level's channels {widths}; lower norm_groups or change base_channels"
        )
    bad = sorted(i for i in set(attention_levels) if i >= len(channel_mult))
    if bad:
        raise ValueError(
            f"attention_levels {bad} out of range: levels are 0..{len(channel_mult) - 1} "
            "(one per channel_mult entry)"
        )
    attn_widths = sorted({widths[i] for i in attention_levels} | ({widths[-1]} if mid_attention else set()))
    if head_channels is not None:
        if any(w % head_channels for w in attn_widths):
            raise ValueError(
                f"head_channels ({head_channels}) must divide every attention layer's channels {attn_widths}"
            )
    elif any(w % num_heads for w in attn_widths):
        raise ValueError(f"num_heads ({num_heads}) must divide every attention layer's channels {attn_widths}")


# -- building blocks ------------------------------------------------------------------------
class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + embedding, GroupNorm-SiLU-dropout-conv, + skip (DDPM).

    With `scale_shift` the embedding enters as ADM's adaptive GroupNorm instead of a sum:
    norm2(h) * (1 + scale) + shift (Dhariwal & Nichol 2021, sec. 3), which lets the time and
    the condition gate features rather than only offset them.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float,
                 scale_shift: bool = False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        # `emb` has been through SiLU once for all blocks (DDPM applies it per block).
        h = self.conv1(F.silu(self.norm1(x)))
        emb = self.emb_proj(emb)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + emb)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v (Vaswani et al. eq. 1) of B x N x C queries
    on B x M x C keys/values; B x N x C out. The head split is a view, SDPA does the rest."""
    q, k, v = (x.unflatten(-1, (heads, -1)).transpose(1, 2) for x in (q, k, v))
    if q.device.type != "cpu" or (q.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")):
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    # torch's CPU flash-attention backward is slow in bf16 with few channels per head: at 16
    # heads of 8 channels on 64 positions, forward + backward took 35 ms in bf16 and 6 ms in
    # float32 (benchmarks/README.md). So on the CPU the softmax core runs in float32, with
    # autocast off (it would cast the inputs straight back to bf16).
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    return out.to(q.dtype).transpose(1, 2).flatten(2)


class SelfAttention(nn.Module):
    """x + proj(attention of norm(x) over its h*w positions) (DDPM's 16x16 attention)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        # B x C x h x w -> B x hw x C: a free view when x is channels_last.
        h = self.norm(x).flatten(2).transpose(1, 2)
        h = self.proj(attend(*self.qkv(h).chunk(3, dim=-1), self.heads))
        return x + h.transpose(1, 2).unflatten(2, x.shape[2:])


class CrossAttention(nn.Module):
    """x + proj(attention of norm(x) on the B x L x D condition tokens) (LDM eq. 3)."""

    def __init__(self, channels: int, context_dim: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(context_dim, 2 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm(x).flatten(2).transpose(1, 2)
        h = self.proj(attend(self.q(h), *self.kv(context).chunk(2, dim=-1), self.heads))
        return x + h.transpose(1, 2).unflatten(2, x.shape[2:])


class Stage(nn.Module):
    """A ResBlock, then (if configured) self-attention, cross-attention and a resampling conv."""

    def __init__(self, res: ResBlock, attn=None, xattn=None, resample=None):
        super().__init__()
        self.res, self.attn, self.xattn, self.resample = res, attn, xattn, resample

    def forward(self, x, emb, context):
        x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.xattn is not None:
            x = self.xattn(x, context)
        if self.resample is not None:
            x = self.resample(x)
        return x


class Downsample(nn.Module):
    """3x3 conv with stride 2 (DDPM's learned downsampling)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x, emb=None, context=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv (avoids the checkerboard of transposed convs)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# -- the model --------------------------------------------------------------------------------
class UNet(Denoiser):
    """Self-attention UNet denoiser; see the module docstring for the layout."""

    def __init__(
        self,
        in_channels: int = 4,
        out_channels: int | None = None,
        base_channels: int = 64,
        channel_mult: list[int] | tuple[int, ...] = (1, 2),
        num_res_blocks: int = 2,
        attention_levels: list[int] | tuple[int, ...] = (1,),
        mid_attention: bool = True,
        num_heads: int = 4,
        head_channels: int | None = None,
        dropout: float = 0.0,
        norm_groups: int = 32,
        scale_shift: bool = False,
        cond_mode: CondMode = "none",
        cond_dim: int | None = None,
        prediction_type: PredictionType = "epsilon",
    ):
        super().__init__()
        try:
            check_architecture(base_channels, list(channel_mult), list(attention_levels), mid_attention,
                               num_heads, head_channels, norm_groups)
        except ValueError as e:
            raise SpecError(f"denoiser (unet): {e}") from None
        if cond_mode not in ("none", "vector", "sequence"):
            raise SpecError(f"denoiser (unet): cond_mode must be 'none', 'vector' or 'sequence', got {cond_mode!r} "
                            "('auto' is resolved by the registry's factory)")
        if cond_mode != "none" and not cond_dim:
            raise SpecError(f"denoiser (unet): cond_mode '{cond_mode}' needs cond_dim, the conditioner's D")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.prediction_type = prediction_type
        self.conditioning = Conditioning(cond_mode, cond_dim or 0)
        self.base_channels = base_channels
        self.num_levels = len(channel_mult)
        emb_dim = 4 * base_channels
        widths = [base_channels * m for m in channel_mult]
        attention_levels = set(attention_levels)

        def heads(ch: int) -> int:
            return ch // head_channels if head_channels else num_heads

        def stage(in_ch, out_ch, level_attention, resample=None) -> Stage:
            attn = xattn = None
            if level_attention:
                attn = SelfAttention(out_ch, heads(out_ch), norm_groups)
                if cond_mode == "sequence":
                    xattn = CrossAttention(out_ch, cond_dim, heads(out_ch), norm_groups)
            res = ResBlock(in_ch, out_ch, emb_dim, norm_groups, dropout, scale_shift)
            return Stage(res, attn, xattn, resample)

        self.time_mlp = nn.Sequential(
            nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if cond_mode != "none":
            self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            # Norm ~1 like a normalised sentence embedding; trained like any other weight.
            self.null_cond = nn.Parameter(torch.randn(cond_dim) / math.sqrt(cond_dim))

        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch = [base_channels], base_channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(stage(ch, width, level in attention_levels))
                ch = width
                skips.append(ch)
            if level < self.num_levels - 1:
                self.down.append(Downsample(ch))
                skips.append(ch)

        self.mid = stage(ch, ch, mid_attention)
        self.mid_res = ResBlock(ch, ch, emb_dim, norm_groups, dropout, scale_shift)

        self.up = nn.ModuleList()
        for level in reversed(range(self.num_levels)):
            width = widths[level]
            for i in range(num_res_blocks + 1):
                upsample = Upsample(width) if level > 0 and i == num_res_blocks else None
                self.up.append(stage(ch + skips.pop(), width, level in attention_levels, upsample))
                ch = width

        self.norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)

    # -- inputs ---------------------------------------------------------------------------
    def _check_inputs(self, z_t, t, cond, drop) -> None:
        """Shape checks only (no data-dependent control flow, so torch.compile traces them away)."""
        if z_t.ndim != 4 or z_t.shape[1] != self.in_channels:
            raise SpecError(f"unet: z_t must be B x {self.in_channels} x h x w (denoiser.in_channels), "
                            f"got {tuple(z_t.shape)}")
        B, factor = z_t.shape[0], 2 ** (self.num_levels - 1)
        if z_t.shape[2] % factor or z_t.shape[3] % factor:
            raise SpecError(f"unet: latent size {tuple(z_t.shape[2:])} is not divisible by {factor} "
                            f"(2^(levels-1) for {self.num_levels} denoiser.channel_mult levels); choose "
                            f"data.image_size so that image_size / the autoencoder's f is a multiple of {factor}, "
                            "or use fewer denoiser.channel_mult levels")
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != B):
            raise SpecError(f"unet: t must hold one timestep per sample (shape ({B},)), got {tuple(t.shape)}")
        if drop is not None and tuple(drop.shape) != (B,):
            raise SpecError(f"unet: drop must be {B} bools, one per sample, got shape {tuple(drop.shape)}")
        kind, D = self.conditioning.kind, self.conditioning.dim
        if cond is None:
            return
        if kind == "none":
            raise SpecError("unet: got a condition but the denoiser is unconditional (cond_mode 'none'); "
                            "set denoiser.cond_mode, or configure no conditioner")
        if kind == "vector" and (cond.ndim != 2 or tuple(cond.shape) != (B, D)):
            raise SpecError(f"unet: cond must be B x D = {B} x {D} (vector conditioning), got {tuple(cond.shape)}; "
                            "denoiser.cond_dim must equal the conditioner's output dim")
        if kind == "sequence" and (cond.ndim != 3 or cond.shape[0] != B or cond.shape[2] != D or cond.shape[1] < 1):
            raise SpecError(f"unet: cond must be B x L x D = {B} x L x {D} (sequence conditioning), "
                            f"got {tuple(cond.shape)}; denoiser.cond_dim must equal the conditioner's output dim")

    def _condition(self, cond, drop, B: int) -> torch.Tensor:
        """The condition with `null_cond` where dropped: B x D (vector) or B x L x D (sequence)."""
        if cond is None:
            shape = (B, -1) if self.conditioning.kind == "vector" else (B, 1, -1)
            return self.null_cond.expand(shape)
        cond = cond.to(self.null_cond.dtype)  # a float32 embedding into a bf16 model
        if drop is not None:
            keep_shape = (B,) + (1,) * (cond.ndim - 1)
            cond = torch.where(drop.bool().view(keep_shape), self.null_cond, cond)
        return cond

    def forward(self, z_t, t, cond=None, drop=None):
        t = torch.as_tensor(t, device=z_t.device)
        self._check_inputs(z_t, t, cond, drop)
        B = z_t.shape[0]
        emb_in = timestep_embedding(t.expand(B), self.base_channels)
        emb = self.time_mlp(emb_in.to(self.time_mlp[0].weight.dtype))
        context = None
        if self.conditioning.kind != "none":
            context = self._condition(cond, drop, B)
            pooled = context if context.ndim == 2 else context.mean(dim=1)
            emb = emb + self.cond_mlp(pooled.to(emb.dtype))
        emb = F.silu(emb)

        relayout = prefers_channels_last(z_t) and z_t.is_contiguous()
        h = self.conv_in(z_t.contiguous(memory_format=torch.channels_last) if relayout else z_t)
        hs = [h]
        for layer in self.down:
            h = layer(h, emb, context)
            hs.append(h)
        h = self.mid_res(self.mid(h, emb, context), emb)
        for layer in self.up:
            h = layer(torch.cat([h, hs.pop()], dim=1), emb, context)
        out = self.conv_out(F.silu(self.norm_out(h)))
        return out.contiguous() if relayout else out  # the caller gets the layout it gave


# -- spec and registration ----------------------------------------------------------------
class UNetSpec(ComponentSpec):
    """Self-attention UNet denoiser (DDPM/ADM layout).

    The defaults are a small model (4.0M parameters unconditional) that trains on a CPU on
    4x8x8 or 4x16x16 latents. The "R64" benchmark config, block for block diffusers'
    UNet2DModel(block_out_channels=(64, 128, 128), layers_per_block=2, attention in the two
    lower blocks, attention_head_dim=8) on 4x16x16 latents, is::

        denoiser: {type: unet, base_channels: 64, channel_mult: [1, 2, 2], num_res_blocks: 2,
                   attention_levels: [1, 2], mid_attention: true, head_channels: 8}

    with 6,804,868 parameters unconditional, the same count as UNet2DModel.
    """

    type: Literal["unet"] = "unet"
    in_channels: int | None = Field(None, ge=1)
    """Latent channels in (None: the autoencoder's latent channels, else 4)."""
    out_channels: int | None = Field(None, ge=1)
    """Channels predicted (None: same as in_channels)."""
    base_channels: int = Field(64, ge=1, le=4096)
    """Channels of level 0; level i has base_channels * channel_mult[i]; the time embedding has 4x."""
    channel_mult: list[PositiveInt] = Field(default_factory=lambda: [1, 2], min_length=1, max_length=8)
    """One multiplier per level; the latent is halved between levels (h must divide by 2^(levels-1))."""
    num_res_blocks: int = Field(2, ge=1, le=16)
    """ResNet blocks per level going down (the up path has one more, for the extra skip)."""
    attention_levels: list[NonNegativeInt] = Field(default_factory=lambda: [1], max_length=8)
    """Levels with self-attention after every block; level i works at h / 2^i of the latent."""
    mid_attention: bool = True
    """Self-attention (and cross-attention, for sequences) between the two middle blocks."""
    num_heads: int = Field(4, ge=1)
    """Attention heads of every attention layer (ignored when head_channels is set)."""
    head_channels: int | None = Field(None, ge=1)
    """Channels per head; heads = channels // head_channels at each level (diffusers' attention_head_dim)."""
    dropout: float = Field(0.0, ge=0, lt=1)
    """Dropout before the second conv of every ResNet block."""
    norm_groups: int = Field(32, ge=1)
    """GroupNorm groups; must divide base_channels and every level's channels."""
    scale_shift: bool = False
    """ADM's adaptive GroupNorm: the time + condition embedding scales and shifts each ResNet
    block's features instead of being added (diffusers' resnet_time_scale_shift="scale_shift")."""
    cond_mode: Literal["auto", "none", "vector", "sequence"] = "auto"
    """How the condition enters: auto follows the configured conditioner (none without one);
    vector joins the time embedding; sequence adds cross-attention after each self-attention."""
    cond_dim: int | None = Field(None, ge=1)
    """D of the condition (None: the conditioner's output dim)."""
    prediction_type: PredictionType = "epsilon"
    """What the network predicts: epsilon (the noise, Noise2Art's choice), v or sample (z0)."""

    @model_validator(mode="after")
    def _channels_work_out(self):
        check_architecture(self.base_channels, self.channel_mult, self.attention_levels, self.mid_attention,
                           self.num_heads, self.head_channels, self.norm_groups)
        return self


def resolve_conditioning(cond_mode: str, cond_dim: int | None, given) -> tuple[CondMode, int | None]:
    """(mode, dim) from the spec and the conditioner's `Conditioning` (None: no conditioner)."""
    if given is not None and getattr(given, "kind", "none") == "none":
        given = None
    if cond_mode == "auto":
        if given is None:
            return "none", None
        cond_mode = given.kind
    if cond_mode == "none":
        return "none", None
    if given is not None and given.kind != cond_mode:
        raise SpecError(f"denoiser.cond_mode: '{cond_mode}' but the conditioner gives a {given.kind} "
                        f"(D={given.dim}); use 'auto' or '{given.kind}'")
    dim = cond_dim or (given.dim if given is not None else None)
    if dim is None:
        raise SpecError(f"denoiser.cond_dim: cond_mode is '{cond_mode}' and no conditioner gives its dim; "
                        "set denoiser.cond_dim or configure a conditioner")
    if given is not None and dim != given.dim:
        raise SpecError(f"denoiser.cond_dim: {dim} but the conditioner gives D={given.dim}; "
                        f"leave cond_dim unset or set it to {given.dim}")
    return cond_mode, dim


def build(spec: UNetSpec, ctx: BuildContext) -> UNet:
    """Self-attention UNet (DDPM/ADM layout) with vector or cross-attention conditioning."""
    params = spec.params()
    params["in_channels"] = spec.in_channels or ctx.latent_channels or 4
    params["cond_mode"], params["cond_dim"] = resolve_conditioning(spec.cond_mode, spec.cond_dim, ctx.conditioning)
    return UNet(**params)


@hookimpl
def register_denoisers(register):
    register("unet", UNetSpec, build,
             "Self-attention UNet (DDPM/ADM layout; vector or cross-attention conditioning)")
