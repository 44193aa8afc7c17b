"""Inflate a Stable Diffusion image VAE into a CV-VAE v1 (how CV-VAE training starts).

Each 2D kernel goes to the temporal tap that sees the current frame (the tap at
the conv's front time padding: the last tap of a causal conv, the centre of a
symmetric one), other taps are zero; per-frame 2D convs and norms copy as they
are. With causal front padding replicating the first frame, a single image
(T = 1) then runs through the 3D encoder exactly as through the 2D one.

Two differences remain, both from the architectures, not the copy:
- GroupNorm epsilon: CV-VAE v1 uses 1e-5 where the SD VAE uses 1e-6;
- the SD VAE's `quant_conv` / `post_quant_conv` (1x1) are folded into the
  encoder's `conv_out` / decoder's `conv_in`. The encoder fold is exact; the
  decoder fold differs on the latent's one-pixel border, where the original
  zero-pads after the 1x1 conv's bias was added.
Layers with no 2D counterpart (the decoder's temporal attention) keep their init.
"""

from __future__ import annotations

import re

import numpy as np
from flax import nnx

from . import weights
from .layers import Conv
from .model_config import CVVAEConfig, ImageVAEConfig


def config_from_image_vae(cfg: ImageVAEConfig, **overrides) -> CVVAEConfig:
    boc = cfg.block_out_channels
    if any(c % boc[0] for c in boc):
        raise ValueError(f"block_out_channels={boc} are not multiples of the first width")
    if cfg.norm_num_groups != 32 or cfg.act_fn not in ("silu", "swish"):
        raise ValueError("CV-VAE v1 uses GroupNorm(32) and SiLU; this image VAE has "
                         f"norm_num_groups={cfg.norm_num_groups}, act_fn={cfg.act_fn!r}")
    fields = dict(ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc),
                  num_res_blocks=cfg.layers_per_block, z_channels=cfg.latent_channels,
                  in_channels=cfg.in_channels, out_ch=cfg.out_channels,
                  scaling_factor=cfg.scaling_factor,
                  encoder_attn_type="vanilla-xformers" if cfg.mid_block_add_attention else "none",
                  decoder_attn_type=("spatial-temporal-xformer" if cfg.mid_block_add_attention
                                     else "none"))
    fields.update(overrides)
    return CVVAEConfig.from_dict(fields)


def _rename(key: str, levels: int) -> str | None:
    """diffusers AutoencoderKL key -> CVVAEModel key (None: folded elsewhere)."""
    if key.startswith(("quant_conv.", "post_quant_conv.")):
        return None
    subs = [
        (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_([qkv])\.", r"\1.mid.attn_1.\2."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{\1}.upsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.up.{\1}.block."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"\.conv_norm_out\.", ".norm_out."),
    ]
    for pattern, repl in subs:
        key = re.sub(pattern, repl, key)
    # decoder up_blocks count from the lowest resolution, LDM's `up` from the highest.
    return re.sub(r"\{(\d+)\}", lambda m: str(levels - 1 - int(m.group(1))), key)


def _fit(src: np.ndarray, dst_shape: tuple[int, ...], tap: int) -> np.ndarray:
    """A torch-layout 2D weight placed into a 3D (or larger-output) slot."""
    if src.shape == dst_shape:
        return src
    if src.ndim == 2:  # Linear (O, I) -> 1x1 conv (O, I, 1, 1)
        src = src[:, :, None, None]
    if len(dst_shape) == 5 and src.ndim == 4:
        out = np.zeros((src.shape[0], src.shape[1], dst_shape[2], *src.shape[2:]), src.dtype)
        out[:, :, tap] = src
        src = out
    if dst_shape[0] == 2 * src.shape[0] and dst_shape[1:] == src.shape[1:]:
        # A time-doubling upsampler emits two frames per input: each gets the 2D conv.
        src = np.concatenate([src, src], axis=0)
    if src.shape != dst_shape:
        raise ValueError(f"cannot fit a {src.shape} weight into {dst_shape}")
    return src


def _fold_after(w, b, q_w, q_b):
    """conv(w, b) followed by a 1x1 conv (q_w, q_b), as one conv."""
    q = q_w[:, :, 0, 0]
    return np.einsum("om,m...->o...", q, w), q @ b + q_b


def _fold_before(w, b, p_w, p_b):
    """A 1x1 conv (p_w, p_b) followed by conv(w, b), as one conv (exact off the border)."""
    p = p_w[:, :, 0, 0]
    return np.einsum("oi...,im->om...", w, p), b + w.sum(axis=(2, 3)) @ p_b


def time_taps(model) -> dict[str, int]:
    """torch key prefix of each conv -> the temporal tap that sees the current frame."""
    return {".".join(map(str, path)): module.pads[0][0]
            for path, module in nnx.iter_graph(model)
            if isinstance(module, Conv) and len(module.kernel_size) == 3}


def inflate(cls, image_vae, *, seed: int = 0, param_dtype=np.float32, **config_overrides):
    """A `cls` (CVVAE) v1 model whose weights come from `image_vae` (module docstring)."""
    if not isinstance(getattr(image_vae, "config", None), ImageVAEConfig):
        raise TypeError(f"inflation takes an ImageVAE (the SD image VAE), got a {type(image_vae).__name__}")
    cfg = config_from_image_vae(image_vae.config, **config_overrides)
    video_vae = cls.from_config(cfg, seed=seed, dtype=image_vae.dtype, param_dtype=param_dtype)
    src = image_vae.state_dict()
    if "quant_conv.weight" in src:
        src["encoder.conv_out.weight"], src["encoder.conv_out.bias"] = _fold_after(
            src["encoder.conv_out.weight"], src["encoder.conv_out.bias"],
            src["quant_conv.weight"], src["quant_conv.bias"])
    if "post_quant_conv.weight" in src:
        src["decoder.conv_in.weight"], src["decoder.conv_in.bias"] = _fold_before(
            src["decoder.conv_in.weight"], src["decoder.conv_in.bias"],
            src["post_quant_conv.weight"], src["post_quant_conv.bias"])
    dst = video_vae.state_dict()
    taps = time_taps(video_vae)
    for key, value in src.items():
        new = _rename(key, cfg.levels)
        if new is None:
            continue
        if new not in dst:
            raise KeyError(f"inflation maps {key} to {new}, which the CV-VAE does not have")
        dst[new] = _fit(value, dst[new].shape, taps.get(new.rsplit(".", 1)[0], 0))
    graphdef, state = nnx.split(video_vae)
    state = weights.fill_state(state, dst, source="the inflated image VAE", param_dtype=param_dtype)
    return nnx.merge(graphdef, state)
