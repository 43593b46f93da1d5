"""The VQGAN as a diffusers `VQModel`, the KL autoencoder as an `AutoencoderKL`, with the same
weights (`n2a export --format diffusers`).

Block for block the two are the same network (taming's layout: pre-activation ResNet
blocks, one-head attention, GroupNorm eps 1e-6, nearest + conv up-sampling, one extra
decoder block per level), so the weights map one to one, with two small additions:
VQModel's 1x1 `quant_conv` and `post_quant_conv`, which n2a does not have, are set to
the identity; and its `scaling_factor` is n2a's latent scale (diffusers pipelines
multiply latents by it after encoding and divide before decoding, as n2a does inside).

decode (quantize, then decode) is the same function. encode is not quite: diffusers'
encoder pads its stride-2 convolutions on the right and bottom only, n2a's on all four
sides, and diffusers hard-codes that padding. `VQModel.encode` therefore differs from
n2a's encoder by that one-pixel shift of every down-sampling; latents for diffusion
come from n2a's encoder (or from `VQModel.encode` for a model trained on those).
"""

from __future__ import annotations

import torch

from n2a_core import SpecError
from n2a_plugins.vqgan.losses import group_count
from n2a_plugins.vqgan.model import (
    VQGAN,
    AdversarialAutoencoder,
    AttnBlock,
    Downsample,
    KLAutoencoder,
    ResnetBlock,
    Upsample,
)


def check_groups(channels: list[int]) -> int:
    """The one GroupNorm group count diffusers needs; SpecError naming the option otherwise."""
    groups = {group_count(c) for c in channels}
    if len(groups) != 1:
        raise SpecError(f"autoencoder.base_channels: GroupNorm groups differ between levels ({sorted(groups)}, "
                        "gcd(32, channels)); diffusers' autoencoders use one norm_num_groups")
    return groups.pop()


def _resnet(out: dict, src: ResnetBlock, dst: str) -> None:
    names = {"norm1": src.norm1, "conv1": src.conv1, "norm2": src.norm2, "conv2": src.conv2}
    if not isinstance(src.shortcut, torch.nn.Identity):
        names["conv_shortcut"] = src.shortcut
    for name, module in names.items():
        out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = module.weight, module.bias


def _attention(out: dict, src: AttnBlock, dst: str) -> None:
    """1x1 convs (q, k, v stacked; proj) -> diffusers Attention's linear layers."""
    out[f"{dst}.group_norm.weight"], out[f"{dst}.group_norm.bias"] = src.norm.weight, src.norm.bias
    for name, w, b in zip(("to_q", "to_k", "to_v"), src.qkv.weight.flatten(1).chunk(3), src.qkv.bias.chunk(3),
                            strict=True):
        out[f"{dst}.{name}.weight"], out[f"{dst}.{name}.bias"] = w, b
    out[f"{dst}.to_out.0.weight"], out[f"{dst}.to_out.0.bias"] = src.proj.weight.flatten(1), src.proj.bias


def _blocks(out: dict, modules, dst: str, resample: str) -> None:
    """A Sequential of ResNet / attention / resampling blocks -> diffusers' per-level blocks."""
    level = resnets = attentions = 0
    for module in modules:
        prefix = f"{dst}.{level}"
        if isinstance(module, ResnetBlock):
            _resnet(out, module, f"{prefix}.resnets.{resnets}")
            resnets += 1
        elif isinstance(module, AttnBlock):
            _attention(out, module, f"{prefix}.attentions.{attentions}")
            attentions += 1
        elif isinstance(module, Downsample | Upsample):
            out[f"{prefix}.{resample}.0.conv.weight"], out[f"{prefix}.{resample}.0.conv.bias"] = (
                module.conv.weight, module.conv.bias)
            level, resnets, attentions = level + 1, 0, 0


def _middle(out: dict, mid, dst: str) -> None:
    _resnet(out, mid[0], f"{dst}.resnets.0")
    _attention(out, mid[1], f"{dst}.attentions.0")
    _resnet(out, mid[2], f"{dst}.resnets.1")


def _config(model: AdversarialAutoencoder, base_channels: int, channel_mult: list[int], num_res_blocks: int,
            attention_levels: list[int], sample_size: int) -> dict:
    """The constructor arguments VQModel and AutoencoderKL share, for `model`'s network."""
    channels = [base_channels * m for m in channel_mult]
    levels = range(len(channel_mult))
    return dict(
        in_channels=3, out_channels=3,
        down_block_types=[("AttnDownEncoderBlock2D" if i in attention_levels else "DownEncoderBlock2D")
                          for i in levels],
        up_block_types=[("AttnUpDecoderBlock2D" if i in attention_levels else "UpDecoderBlock2D")
                        for i in reversed(levels)],
        block_out_channels=channels, layers_per_block=num_res_blocks, act_fn="silu",
        latent_channels=model.latent_channels, sample_size=sample_size, norm_num_groups=check_groups(channels),
        scaling_factor=float(model.latent_scale), mid_block_add_attention=True,
    )  # fmt: skip


def _coder_weights(model: AdversarialAutoencoder) -> dict[str, torch.Tensor]:
    """The encoder's and decoder's weights under diffusers' names (the same in both classes)."""
    out: dict[str, torch.Tensor] = {}
    for side, coder in (("encoder", model.encoder), ("decoder", model.decoder)):
        out[f"{side}.conv_in.weight"], out[f"{side}.conv_in.bias"] = coder.conv_in.weight, coder.conv_in.bias
        _middle(out, coder.mid, f"{side}.mid_block")
        out[f"{side}.conv_norm_out.weight"], out[f"{side}.conv_norm_out.bias"] = (
            coder.norm_out.weight, coder.norm_out.bias)
        out[f"{side}.conv_out.weight"], out[f"{side}.conv_out.bias"] = coder.conv_out.weight, coder.conv_out.bias
    _blocks(out, model.encoder.down, "encoder.down_blocks", "downsamplers")
    _blocks(out, model.decoder.up, "decoder.up_blocks", "upsamplers")
    return out


def _loaded(target, weights: dict[str, torch.Tensor]):
    target.load_state_dict({k: v.detach().float().clone() for k, v in weights.items()}, strict=True)
    return target.eval()


def to_vqmodel(model: VQGAN, **architecture):
    """A diffusers VQModel holding `model`'s weights (see the module docstring)."""
    from diffusers import VQModel

    if model.quantizer.l2_normalize:
        raise SpecError("autoencoder.l2_normalize_codes: diffusers' VQModel looks codes up by plain "
                        "Euclidean distance, not cosine similarity; no diffusers equivalent")
    z = model.latent_channels
    config = _config(model, **architecture)
    vq = VQModel(**config, num_vq_embeddings=model.quantizer.num_codes, vq_embed_dim=z)
    out = _coder_weights(model)
    identity = torch.eye(z)[:, :, None, None]
    for conv in ("quant_conv", "post_quant_conv"):
        out[f"{conv}.weight"], out[f"{conv}.bias"] = identity, torch.zeros(z)
    out["quantize.embedding.weight"] = model.quantizer.embedding.weight
    return _loaded(vq, out)


def to_autoencoder_kl(model: KLAutoencoder, **architecture):
    """A diffusers AutoencoderKL holding `model`'s weights: the encoder's output is the
    same (mean, log-variance) pair, and n2a has no 1x1 quant convs, so they are left out."""
    from diffusers import AutoencoderKL

    kl = AutoencoderKL(**_config(model, **architecture), use_quant_conv=False, use_post_quant_conv=False)
    return _loaded(kl, _coder_weights(model))
