import argparse

import jax.numpy as jnp
import pytest

from cvvae_jax import dtypes


@pytest.mark.parametrize("name,want", [("float32", "float32"), ("fp32", "float32"), ("BF16", "bfloat16"),
                                       ("bfloat16", "bfloat16")])
def test_long_and_short_names_give_the_same_dtype(name, want):
    assert dtypes.canonical(name) == want
    assert dtypes.resolve(name) == jnp.dtype(want)


def test_float16_is_a_storage_dtype_only():
    assert dtypes.resolve("fp16", dtypes.STORAGE) == jnp.float16
    with pytest.raises(ValueError,
                       match=r"--dtype 'fp16': expected one of float32, bfloat16 \(or fp32, bf16\)"):
        dtypes.canonical("fp16", what="--dtype")


def test_argparse_type_reports_the_choices():
    p = argparse.ArgumentParser()
    p.add_argument("--dtype", type=dtypes.arg(), default="float32")
    assert p.parse_args(["--dtype", "bf16"]).dtype == "bfloat16"
    with pytest.raises(SystemExit):
        p.parse_args(["--dtype", "int8"])
