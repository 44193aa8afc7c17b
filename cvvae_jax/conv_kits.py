"""Which convolution fills each slot of a network, per official flavour.

The three official code bases build the same kinds of blocks with different
convolutions: the v1 CV-VAE zero-pads space and replicates the first frame in
time, the SD3 CV-VAE replicates on every axis, the image VAE is 2D. A kit
answers "what conv goes here" so the blocks themselves are written once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .layers import EDGE, ZEROS, Conv, ResnetBlock, causal_pads, same_pads


@dataclasses.dataclass(frozen=True)
class _Kit:
    dtype: Any
    param_dtype: Any

    def _conv(self, cin, cout, kernel, pads, rngs, strides=None) -> Conv:
        return Conv(cin, cout, kernel, pads, strides=strides, dtype=self.dtype,
                    param_dtype=self.param_dtype, rngs=rngs)

    def conv2d(self, cin, cout, k, rngs) -> Conv:
        return self._conv(cin, cout, (k, k), same_pads(2, k // 2, ZEROS), rngs)


@dataclasses.dataclass(frozen=True)
class V1Kit(_Kit):
    """`CVVAEModel` (models/vae_models.py)."""

    causal: bool = True
    use_3d_conv: bool = True
    half_3d: bool = True

    def main(self, cin, cout, k, rngs) -> Conv:
        """`CausalConv3d` / `nn.Conv3d` / `Conv2dWithExtraDim`, padding k // 2."""
        p = k // 2
        if not self.use_3d_conv:
            return self.conv2d(cin, cout, k, rngs)
        pads = causal_pads(p, ZEROS) if self.causal else same_pads(3, p, ZEROS)
        return self._conv(cin, cout, (k, k, k), pads, rngs)

    def second(self, cin, cout, rngs) -> Conv:
        return self.conv2d(cin, cout, 3, rngs) if self.half_3d else self.main(cin, cout, 3, rngs)

    def shortcut(self, cin, cout, rngs) -> Conv:
        return self.main(cin, cout, 1, rngs)

    def down(self, c, time: bool, rngs) -> Conv:
        # Downsample3D: zeros right/bottom, first frame replicated twice, whatever `causal` says.
        pads = ((2, 0, EDGE), (0, 1, ZEROS), (0, 1, ZEROS))
        return self._conv(c, c, (3, 3, 3), pads, rngs, strides=(2 if time else 1, 2, 2))

    def up(self, c, time: bool, rngs) -> Conv:
        # Upsample3D is always built non-causal: one replicated frame on each side.
        pads = ((1, 1, EDGE), (1, 1, ZEROS), (1, 1, ZEROS))
        return self._conv(c, c * (2 if time else 1), (3, 3, 3), pads, rngs)


@dataclasses.dataclass(frozen=True)
class SD3Kit(_Kit):
    """`CVVAESD3Model` (models/vae_blocks3d_sd3.py): replicate padding on every axis."""

    causal: bool = True
    half_3d: bool = True

    def main(self, cin, cout, k, rngs, strides=None) -> Conv:
        p = k // 2
        pads = causal_pads(p, EDGE) if self.causal else same_pads(3, p, EDGE)
        return self._conv(cin, cout, (k, k, k), pads, rngs, strides=strides)

    def second(self, cin, cout, rngs) -> Conv:
        return self.conv2d(cin, cout, 3, rngs) if self.half_3d else self.main(cin, cout, 3, rngs)

    def shortcut(self, cin, cout, rngs) -> Conv:
        return self.conv2d(cin, cout, 1, rngs)

    def down(self, c, time: bool, rngs) -> Conv:
        return self.main(c, c, 3, rngs, strides=(2 if time else 1, 2, 2))

    def up(self, c, time: bool, rngs) -> Conv:
        return self.main(c, c * (2 if time else 1), 3, rngs)


@dataclasses.dataclass(frozen=True)
class ImageKit(_Kit):
    """diffusers `AutoencoderKL`: 2D, zero padding."""

    def main(self, cin, cout, k, rngs) -> Conv:
        return self.conv2d(cin, cout, k, rngs)

    def second(self, cin, cout, rngs) -> Conv:
        return self.conv2d(cin, cout, 3, rngs)

    def shortcut(self, cin, cout, rngs) -> Conv:
        return self.conv2d(cin, cout, 1, rngs)

    def down(self, c, time: bool, rngs) -> Conv:
        # Downsample2D(padding=0) pads one zero row/column at the bottom/right.
        return self._conv(c, c, (3, 3), ((0, 1, ZEROS), (0, 1, ZEROS)), rngs, strides=(2, 2))

    def up(self, c, time: bool, rngs) -> Conv:
        return self.conv2d(c, c, 3, rngs)


def resnet(kit, cin, cout, *, shortcut_name, groups, eps, act, rngs) -> ResnetBlock:
    return ResnetBlock(
        cin, cout,
        conv1=kit.main(cin, cout, 3, rngs),
        conv2=kit.second(cout, cout, rngs),
        shortcut=kit.shortcut(cin, cout, rngs) if cin != cout else None,
        shortcut_name=shortcut_name, groups=groups, eps=eps, act=act,
        param_dtype=kit.param_dtype, rngs=rngs,
    )

