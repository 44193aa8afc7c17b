"""The official `config.json` files as validated, frozen dataclasses.

Field names and defaults are those of the official `CVVAEModel`, `CVVAESD3Model`
and diffusers `AutoencoderKL` constructors, so a config round-trips unchanged.
Every option is either honoured by the Flax model or rejected here with a message
that says why: nothing is silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, ClassVar

DIFFUSERS_VERSION = "0.42.1"

V1_ATTN_TYPES = ("vanilla", "vanilla-xformers", "spatial-temporal-xformer", "none")


def _check_type(name: str, value, annotation: str) -> None:
    """A JSON value against a field annotation such as "int | None" or "tuple[int, ...]"."""
    ok = (
        (value is None and "None" in annotation)
        or (isinstance(value, (list, tuple)) and "tuple" in annotation)
        or (isinstance(value, bool) and "bool" in annotation)
        or (isinstance(value, int) and not isinstance(value, bool)
            and ("int" in annotation.replace("tuple[int", "") or "float" in annotation))
        or (isinstance(value, float) and "float" in annotation.replace("tuple[float", ""))
        or (isinstance(value, str) and annotation == "str")
    )
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {annotation}")


def _tuple(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class _Config:
    """Shared loading/saving; subclasses list the official fields."""

    CLASS_NAME: ClassVar[str] = ""
    # Counts and widths (or tuples of them), which must be >= 1.
    POSITIVE: ClassVar[tuple[str, ...]] = ()
    # "_"-prefixed bookkeeping keys of the file (e.g. _diffusers_version), written back as read.
    meta: dict = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.name != "meta"]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "_Config":
        d = dict(d)
        class_name = d.pop("_class_name", cls.CLASS_NAME)
        if class_name != cls.CLASS_NAME:
            raise ValueError(f"config is for {class_name!r}, expected {cls.CLASS_NAME!r}")
        meta = {k: d.pop(k) for k in list(d) if k.startswith("_")}
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(
                f"unknown {cls.CLASS_NAME} config option(s): {', '.join(unknown)}; "
                f"known options: {', '.join(cls.field_names())}"
            )
        return cls(meta=meta, **d)

    @classmethod
    def from_json(cls, path: str | Path) -> "_Config":
        try:
            d = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"_class_name": self.CLASS_NAME, "_diffusers_version": DIFFUSERS_VERSION}
        d.update(self.meta)
        for name in self.field_names():
            v = getattr(self, name)
            d[name] = list(v) if isinstance(v, tuple) else v
        return d

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def replace(self, **kw) -> "_Config":
        return dataclasses.replace(self, **kw)

    def __post_init__(self) -> None:
        # Every way of building a config (from_dict, replace, a direct call) is checked:
        # a config built by hand with, say, chunks that are not whole latent frames
        # otherwise gave latents of the wrong length without an error.
        for f in dataclasses.fields(self):
            if f.name == "meta":
                continue
            value = getattr(self, f.name)
            _check_type(f"{self.CLASS_NAME} {f.name}", value, str(f.type))
            # Lists (as JSON has them) become tuples: the config is hashed as static
            # model structure, and a list is not hashable.
            object.__setattr__(self, f.name, _tuple(value))
        for name in self.POSITIVE:
            value = getattr(self, name)
            _reject(any(v < 1 for v in (value if isinstance(value, tuple) else (value,))),
                    f"{self.CLASS_NAME} {name}={value!r} must be >= 1")
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError


def _reject(cond: bool, msg: str) -> None:
    if cond:
        raise ValueError(msg)


@dataclasses.dataclass(frozen=True)
class _VideoConfig(_Config):
    """Options common to both CV-VAE variants: causality, chunking, tiling."""

    causal_encoder: bool = True
    causal_decoder: bool = False
    half_3d: bool = True
    double_z: bool = True
    en_de_n_frames_a_time: int | None = 16
    time_n_compress: int | None = 4
    spatial_n_compress: int | None = 8
    tile_spatial_size: int | None = 576
    # Only used by the official code to reshape 4D (B*T, C, H, W) inputs, which this
    # API does not take (videos are always 5D), so it has no effect on any input.
    num_video_frames: int | None = None
    tile_overlap_ratio: float | None = 0.2222
    # Stored but never read by the official code either.
    reshape_z_dim_to_4: bool = False
    reshape_x_dim_to_4: bool = False

    @property
    def levels(self) -> int:
        raise NotImplementedError

    @property
    def latent_channels(self) -> int:
        raise NotImplementedError

    def time_down_levels(self) -> list[bool]:
        """Which encoder levels halve time: every other one, never the last."""
        return [i % 2 == 0 and i != self.levels - 1 for i in range(self.levels)]

    @property
    def time_factor(self) -> int:
        return 2 ** sum(self.time_down_levels())

    @property
    def space_factor(self) -> int:
        return 2 ** (self.levels - 1)

    @property
    def encode_frames_per_chunk(self) -> int | None:
        return self.en_de_n_frames_a_time

    @property
    def decode_frames_per_chunk(self) -> int | None:
        n = self.en_de_n_frames_a_time
        return None if n is None else n // self.time_n_compress

    def validate(self) -> None:
        _reject(not self.double_z,
                "double_z=False is not supported: the posterior needs mean and log-variance channels")
        _reject(self.reshape_x_dim_to_4,
                "reshape_x_dim_to_4=True flattens decoded videos to (B*T, C, H, W); this API always "
                "returns (B, T, H, W, C) - reshape the result yourself and set it to false")
        _reject(self.levels < 1, "need at least one resolution level")
        if self.time_n_compress is not None:
            _reject(self.time_n_compress != self.time_factor,
                    f"time_n_compress={self.time_n_compress} but this architecture compresses time "
                    f"by {self.time_factor}")
        if self.spatial_n_compress is not None:
            _reject(self.spatial_n_compress != self.space_factor,
                    f"spatial_n_compress={self.spatial_n_compress} but this architecture compresses "
                    f"space by {self.space_factor}")
        n = self.en_de_n_frames_a_time
        if n is not None:
            _reject(self.time_n_compress is None, "en_de_n_frames_a_time needs time_n_compress")
            _reject(n <= 0 or n % self.time_n_compress,
                    f"en_de_n_frames_a_time={n} must be a positive multiple of "
                    f"time_n_compress={self.time_n_compress}")
        tile = self.tile_spatial_size
        if tile is not None:
            _reject(self.spatial_n_compress is None or self.tile_overlap_ratio is None,
                    "tile_spatial_size needs spatial_n_compress and tile_overlap_ratio")
            _reject(not 0 <= self.tile_overlap_ratio < 1,
                    f"tile_overlap_ratio={self.tile_overlap_ratio} must be in [0, 1)")
            f = self.space_factor
            stride = round(tile * (1 - self.tile_overlap_ratio))
            # The official tiler would still run, but tiles that are not multiples of
            # the spatial factor give latents of inconsistent sizes.
            _reject(tile <= 0 or tile % f or stride % f or stride <= 0,
                    f"tile_spatial_size={tile} with tile_overlap_ratio={self.tile_overlap_ratio} "
                    f"gives tiles of {tile} px every {stride} px; both must be positive multiples of {f}")
        _reject(self.num_video_frames is not None and self.num_video_frames < 1,
                f"num_video_frames={self.num_video_frames} must be positive")


@dataclasses.dataclass(frozen=True)
class CVVAEConfig(_VideoConfig):
    """`CVVAEModel`: the SD2.1-compatible CV-VAE v1 (LDM block names)."""

    CLASS_NAME: ClassVar[str] = "CVVAEModel"
    POSITIVE: ClassVar[tuple[str, ...]] = ("z_channels", "in_channels", "out_ch", "ch", "ch_mult",
                                           "num_res_blocks")

    z_channels: int = 4
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    dropout: float = 0.0
    use_3d_conv: bool = True
    encoder_attn_type: str = "vanilla-xformers"
    decoder_attn_type: str = "spatial-temporal-xformer"
    scaling_factor: float = 0.18215
    force_upcast: bool = True

    @property
    def levels(self) -> int:
        return len(self.ch_mult)

    @property
    def latent_channels(self) -> int:
        return self.z_channels

    def validate(self) -> None:
        super().validate()
        _reject(self.dropout != 0.0,
                f"dropout={self.dropout} is not supported (every official CV-VAE uses 0.0)")
        for key in ("encoder_attn_type", "decoder_attn_type"):
            v = getattr(self, key)
            _reject(v not in V1_ATTN_TYPES,
                    f"{key}={v!r} is not supported; use one of {', '.join(V1_ATTN_TYPES)}")
        _reject(self.ch % 32 or any(self.ch * m % 32 for m in self.ch_mult),
                f"ch={self.ch}, ch_mult={self.ch_mult}: every width must be a multiple of 32 "
                "(GroupNorm with 32 groups)")


@dataclasses.dataclass(frozen=True)
class CVVAESD3Config(_VideoConfig):
    """`CVVAESD3Model`: the 16-channel CV-VAE for SD3 (diffusers block names)."""

    CLASS_NAME: ClassVar[str] = "CVVAESD3Model"
    POSITIVE: ClassVar[tuple[str, ...]] = ("in_channels", "out_channels", "block_out_channels",
                                           "layers_per_block", "norm_num_groups")

    in_channels: int = 3
    out_channels: int = 16
    down_block_types: tuple[str, ...] = ("DownEncoderBlock3D",) * 4
    up_block_types: tuple[str, ...] = ("UpDecoderBlock3D",) * 4
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    act_fn: str = "silu"
    mid_block_add_attention: bool = True

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def latent_channels(self) -> int:
        return self.out_channels

    def validate(self) -> None:
        super().validate()
        _validate_blocks(self, "3D")


@dataclasses.dataclass(frozen=True)
class ImageVAEConfig(_Config):
    """diffusers `AutoencoderKL` (the Stable Diffusion image VAE)."""

    CLASS_NAME: ClassVar[str] = "AutoencoderKL"
    POSITIVE: ClassVar[tuple[str, ...]] = ("in_channels", "out_channels", "block_out_channels",
                                           "layers_per_block", "latent_channels", "norm_num_groups",
                                           "sample_size")

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @property
    def levels(self) -> int:
        return len(self.block_out_channels)

    @property
    def space_factor(self) -> int:
        return 2 ** (self.levels - 1)

    def validate(self) -> None:
        _validate_blocks(self, "2D")


def _validate_blocks(cfg, dims: str) -> None:
    from .layers import ACTIVATIONS

    n = len(cfg.block_out_channels)
    for key, kind in (("down_block_types", f"DownEncoderBlock{dims}"),
                      ("up_block_types", f"UpDecoderBlock{dims}")):
        types = getattr(cfg, key)
        _reject(len(types) != n, f"{key} has {len(types)} entries but block_out_channels has {n}")
        bad = [t for t in types if t.removeprefix("UNetRes") != kind]
        _reject(bool(bad), f"{key}: only {kind!r} blocks exist in this model, got {bad}")
    _reject(cfg.act_fn not in ACTIVATIONS,
            f"act_fn={cfg.act_fn!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    _reject(any(c % cfg.norm_num_groups for c in cfg.block_out_channels),
            f"block_out_channels={cfg.block_out_channels} must be multiples of "
            f"norm_num_groups={cfg.norm_num_groups}")


CONFIG_CLASSES = {c.CLASS_NAME: c for c in (CVVAEConfig, CVVAESD3Config, ImageVAEConfig)}


def load_config(path: str | Path) -> _Config:
    """Read a config.json and pick its class from `_class_name`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object of config options, got a {type(d).__name__}")
    name = d.get("_class_name")
    if name not in CONFIG_CLASSES:
        raise ValueError(f"{path}: _class_name={name!r}; supported: {', '.join(CONFIG_CLASSES)}")
    return CONFIG_CLASSES[name].from_dict(d)


def frame_count_problem(t: int, time_factor: int) -> str | None:
    """Why t frames cannot be encoded, with the nearest counts that can; None if they can."""
    if t >= 1 and (t - 1) % time_factor == 0:
        return None
    k = max(0, t - 1) // time_factor
    lo, hi = 1 + k * time_factor, 1 + (k + 1) * time_factor
    return f"the causal encoder needs 1 + {time_factor}k frames (nearest valid: {lo} or {hi})"
