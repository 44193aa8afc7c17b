"""The posterior against closed forms computed by hand."""

import jax
import numpy as np

from cvvae_jax import DiagonalGaussian


def test_split_and_clamp():
    moments = np.array([[[1.0, -2.0, 25.0, -40.0]]], np.float32)  # (1, 1, 4): C = 2
    post = DiagonalGaussian.from_moments(moments)
    np.testing.assert_array_equal(post.mean, [[[1.0, -2.0]]])
    np.testing.assert_array_equal(post.logvar, [[[20.0, -30.0]]])  # clamped
    np.testing.assert_allclose(post.std, np.exp([[[10.0, -15.0]]]), rtol=1e-6)
    np.testing.assert_array_equal(post.mode(), post.mean)


def test_kl_and_nll_sum_over_all_but_batch():
    mean = np.array([[0.5, -1.0], [0.0, 0.0]], np.float32)
    logvar = np.array([[0.0, np.log(2.0)], [0.0, 0.0]], np.float32)
    post = DiagonalGaussian(mean=mean, logvar=logvar)
    # 0.5 * sum(mu^2 + var - 1 - logvar): [0.5*(0.25 + 0 + 1 + 2 - 1 - ln 2), 0]
    np.testing.assert_allclose(post.kl(), [0.5 * (0.25 + 1.0 + 1.0 - np.log(2.0)), 0.0], rtol=1e-6)
    # at the mean, nll = 0.5 * sum(log 2 pi + logvar)
    np.testing.assert_allclose(post.nll(mean), 0.5 * (2 * np.log(2 * np.pi) + logvar.sum(1)),
                               rtol=1e-6)


def test_kl_to_another_gaussian():
    q = DiagonalGaussian(mean=np.array([[1.0, 0.0]], np.float32),
                         logvar=np.array([[0.0, np.log(4.0)]], np.float32))
    p = DiagonalGaussian(mean=np.array([[0.0, 0.0]], np.float32),
                         logvar=np.array([[np.log(2.0), np.log(4.0)]], np.float32))
    # Per axis 0.5 * ((mu_q - mu_p)^2 / var_p + var_q / var_p - 1 - ln var_q + ln var_p):
    # 0.5 * (1/2 + 1/2 - 1 + ln 2) and 0.5 * (0 + 1 - 1 - ln 4 + ln 4) = 0.
    np.testing.assert_allclose(q.kl(p), [0.5 * np.log(2.0)], rtol=1e-6)
    np.testing.assert_allclose(q.kl(q), [0.0], atol=1e-7)
    standard = DiagonalGaussian(mean=np.zeros((1, 2), np.float32), logvar=np.zeros((1, 2), np.float32))
    np.testing.assert_allclose(q.kl(standard), q.kl(), rtol=1e-6)


def test_sample_has_the_posterior_moments():
    mean = np.full((4, 50_000), 3.0, np.float32)
    post = DiagonalGaussian(mean=mean, logvar=np.full_like(mean, np.log(0.25)))
    z = np.asarray(post.sample(jax.random.key(0)))
    assert abs(z.mean() - 3.0) < 0.01 and abs(z.std() - 0.5) < 0.01
    assert not np.array_equal(z, np.asarray(post.sample(jax.random.key(1))))
