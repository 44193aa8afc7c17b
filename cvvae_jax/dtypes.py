"""Dtype names as command lines and configs spell them.

Every entry point takes numpy's names (float32, bfloat16, float16) and also the
short forms the benchmark tables print (fp32, bf16, fp16), so a flag copied from
one command works in another.
"""

from __future__ import annotations

import argparse

import jax.numpy as jnp
import numpy as np

COMPUTE = ("float32", "bfloat16")
STORAGE = ("float32", "bfloat16", "float16")
_SHORT = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def canonical(name, allowed: tuple[str, ...] = COMPUTE, *, what: str = "dtype") -> str:
    """numpy's name for `name`, a string (short forms accepted) or a dtype such as
    jnp.bfloat16; ValueError naming `what` otherwise."""
    if not isinstance(name, str):
        try:
            name = jnp.dtype(name).name if name is not None else "None"
        except TypeError:
            name = repr(name)
    full = _SHORT.get(name.lower(), name.lower())
    if full not in allowed:
        short = [s for s, f in _SHORT.items() if f in allowed]
        raise ValueError(f"{what} {name!r}: expected one of {', '.join(allowed)} "
                         f"(or {', '.join(short)})")
    return full


def resolve(name, allowed: tuple[str, ...] = COMPUTE, *, what: str = "dtype") -> np.dtype:
    return jnp.dtype(canonical(name, allowed, what=what))


def arg(allowed: tuple[str, ...] = COMPUTE):
    """An argparse `type=` that returns the canonical name (argparse reports the ValueError)."""

    def parse(text: str) -> str:
        try:
            return canonical(text, allowed, what="")
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e).strip()) from None

    parse.__name__ = "dtype"
    return parse
