"""LPIPS: against a PyTorch reference on random VGG16 weights, conversion CLI, loading."""

import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.torch import load_file as load_torch_safetensors

from cvvae_jax import lpips, weights

CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
         (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512),
         (26, 512, 512), (28, 512, 512)]
POOLS = (4, 9, 16, 23, 30)
TAPS = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3

distance = jax.jit(lpips.lpips_distance, static_argnums=0)


def torchvision_vgg16_features() -> torch.nn.Sequential:
    """torchvision's vgg16().features, rebuilt layer for layer, with He-normal weights so
    that activations keep their scale through all 13 convs."""
    torch.manual_seed(0)
    layers = [torch.nn.MaxPool2d(2, 2) if i in POOLS else torch.nn.ReLU() for i in range(31)]
    for i, cin, cout in CONVS:
        conv = torch.nn.Conv2d(cin, cout, 3, padding=1)
        torch.nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
        torch.nn.init.uniform_(conv.bias, -0.1, 0.1)
        layers[i] = conv
    return torch.nn.Sequential(*layers).eval()


def reference_lpips(features, x, y):
    """lpips 0.1 on channels-last numpy images: {eps_in_sqrt: per-layer terms (5, N)}.
    eps_in_sqrt=False is lpips 0.1.4's normalize_tensor, True the CV-VAE copy's."""
    heads = load_torch_safetensors(str(lpips.HEADS_FILE))
    shift = torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None]
    scale = torch.tensor([0.458, 0.448, 0.450])[None, :, None, None]

    def taps(img):
        h = (torch.from_numpy(img).permute(0, 3, 1, 2) - shift) / scale
        out = []
        for i, layer in enumerate(features[:30]):
            h = layer(h)
            if i in TAPS:
                out.append(h)
        return out

    def normalize(f, eps_in_sqrt):
        s = torch.sum(f ** 2, dim=1, keepdim=True)
        return f / (torch.sqrt(s + 1e-10 if eps_in_sqrt else s) + 1e-10)

    with torch.no_grad():
        pairs = list(zip(taps(x), taps(y)))
        return {eps_in_sqrt: torch.stack([
            F.conv2d((normalize(a, eps_in_sqrt) - normalize(b, eps_in_sqrt)) ** 2,
                     heads[f"lin{k}.model.1.weight"]).mean([2, 3])[:, 0]
            for k, (a, b) in enumerate(pairs)]).double().numpy()
            for eps_in_sqrt in (True, False)}


def images(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def vgg(tmp_path_factory):
    """(features, .pth path): a torchvision-layout vgg16 state dict, classifier included."""
    features = torchvision_vgg16_features()
    sd = {f"features.{k}": v for k, v in features.state_dict().items()}
    sd |= {"classifier.0.weight": torch.zeros(8, 4), "classifier.0.bias": torch.zeros(8)}
    path = tmp_path_factory.mktemp("vgg") / "vgg16.pth"
    torch.save(sd, path)
    return features, path


@pytest.fixture(scope="module")
def model(vgg):
    return lpips.load_lpips(vgg[1])


def test_matches_pytorch_reference(vgg, model):
    x, y = images((2, 64, 64, 3), 1), images((2, 64, 64, 3), 2)
    got = np.asarray(distance(*nnx.split(model), x, y), np.float64)
    assert got.shape == (2,)
    for eps_in_sqrt, terms in reference_lpips(vgg[0], x, y).items():
        ref = terms.sum(0)
        abs_err, rel_err = np.abs(got - ref).max(), (np.abs(got - ref) / ref).max()
        print(f"eps_in_sqrt={eps_in_sqrt}: lpips {got}, max abs err {abs_err:.2e}, "
              f"max rel err {rel_err:.2e}")
        assert abs_err <= 1e-5 and rel_err <= 1e-5
    # Every layer must weigh in, or the comparison would not test the deep stages.
    assert (terms > 1e-3).all(), terms


def test_same_image_is_near_zero_and_gradients_reach_the_input_only(model):
    graphdef, state = nnx.split(model)
    x, y = images((1, 2, 16, 16, 3), 3), images((1, 2, 16, 16, 3), 4)
    # Not exactly 0 under jit: XLA's conv numerics depend on the position in the batch,
    # so equal images can differ in the last bit of their features (~1e-16 here).
    same = np.asarray(distance(graphdef, state, x, x))
    assert same.shape == (1, 2) and np.abs(same).max() <= 1e-12
    grad = jax.jit(jax.grad(lambda s, a, b: lpips.lpips_distance(graphdef, s, a, b).sum(),
                            argnums=(0, 1)))
    g_state, g_x = grad(state, x, y)
    assert g_x.shape == x.shape and np.isfinite(g_x).all() and np.abs(g_x).max() > 1e-6
    assert all(not np.asarray(v).any() for v in jax.tree.leaves(g_state))
    # At x == y every difference is 0: finite (zero) gradients, no NaN from the sqrt.
    assert np.isfinite(grad(state, x, x)[1]).all()


def test_convert_vgg_round_trip_needs_no_torch(vgg, model, tmp_path, monkeypatch, capsys):
    x, y = images((2, 64, 64, 3), 1), images((2, 64, 64, 3), 2)
    want = np.asarray(distance(*nnx.split(model), x, y))
    for suffix in (".safetensors", ".npz"):
        dst = tmp_path / f"vgg16{suffix}"
        assert lpips.main(["convert-vgg", str(vgg[1]), str(dst)]) == 0
        assert "26 tensors (14,714,688 parameters)" in capsys.readouterr().out
        with monkeypatch.context() as m:
            m.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
            loaded = lpips.load_lpips(dst)
            with pytest.raises(weights.WeightsError, match="convert-vgg"):
                lpips.load_lpips(vgg[1])
        assert set(weights.read_state_dict(dst) if suffix == ".safetensors"
                   else np.load(dst).files) == {f"features.{i}.{p}" for i, _, _ in CONVS
                                                for p in ("weight", "bias")}
        np.testing.assert_array_equal(distance(*nnx.split(loaded), x, y), want)


def test_convert_heads_reproduces_the_bundled_file(tmp_path):
    pth, dst = tmp_path / "vgg.pth", tmp_path / "heads.safetensors"
    torch.save(load_torch_safetensors(str(lpips.HEADS_FILE)), pth)
    assert lpips.main(["convert-heads", str(pth), str(dst)]) == 0
    assert dst.read_bytes() == lpips.HEADS_FILE.read_bytes()


def test_no_backbone_warns_once_and_returns_none(monkeypatch):
    monkeypatch.setattr(lpips, "_warned_disabled", False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert lpips.load_lpips(None) is None
        assert lpips.load_lpips("") is None
    ours = [w for w in caught if "LPIPS" in str(w.message)]
    assert len(ours) == 1
    assert "switched off" in str(ours[0].message) and lpips.CONFIG_KEY in str(ours[0].message)


def test_bad_files_raise_clear_errors(vgg, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        lpips.load_lpips(tmp_path / "nope.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(weights.WeightsError, match="corrupt"):
        lpips.load_lpips(tmp_path / "junk.safetensors")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(weights.WeightsError, match="junk.npz"):
        lpips.load_lpips(tmp_path / "junk.npz")
    (tmp_path / "vgg.onnx").write_bytes(b"")
    with pytest.raises(weights.WeightsError, match="unknown weights format"):
        lpips.load_lpips(tmp_path / "vgg.onnx")
    torch.save({"model": {"a": torch.zeros(1)}}, tmp_path / "nested.pth")
    with pytest.raises(weights.WeightsError, match="not a state dict"):
        lpips.load_lpips(tmp_path / "nested.pth")

    sd = dict(lpips.read_vgg16(vgg[1]))
    sd["features.5.weight"] = sd["features.5.weight"][:, :32]
    np.savez(tmp_path / "narrow.npz", **sd)
    with pytest.raises(weights.WeightsError, match=r"features\.5\.weight has shape"):
        lpips.load_lpips(tmp_path / "narrow.npz")
    del sd["features.28.bias"]
    np.savez(tmp_path / "short.npz", **sd)
    with pytest.raises(weights.WeightsError, match=r"missing keys \(1\): features\.28\.bias"):
        lpips.load_lpips(tmp_path / "short.npz")

    for argv in (["convert-vgg", str(tmp_path / "short.npz"), str(tmp_path / "out.safetensors")],
                 ["convert-vgg", str(vgg[1]), str(tmp_path / "out.pth")],
                 ["convert-vgg", str(vgg[1]), str(tmp_path / "junk.npz")]):
        assert lpips.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "out.safetensors").exists()


def test_input_checks(model):
    a = jnp.zeros((1, 8, 8, 3))
    with pytest.raises(ValueError, match="H and W >= 16"):
        model(a, a)
    with pytest.raises(ValueError, match="one shape"):
        model(jnp.zeros((1, 16, 16, 3)), jnp.zeros((2, 16, 16, 3)))


def test_bfloat16_compute_is_close(vgg, model):
    x, y = images((2, 16, 16, 3), 5), images((2, 16, 16, 3), 6)
    bf16 = lpips.load_lpips(vgg[1], dtype=jnp.bfloat16)
    got, want = distance(*nnx.split(bf16), x, y), distance(*nnx.split(model), x, y)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=5e-2)


def test_max_pool2_is_torch_maxpool_with_the_same_gradient():
    # An odd H: torch drops the last row. Random normal values: no tied maxima.
    x = np.random.default_rng(0).standard_normal((2, 7, 6, 3)).astype(np.float32)
    want = F.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), 2, 2).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(lpips.max_pool2(jnp.asarray(x)), want)
    w = jax.random.normal(jax.random.key(1), want.shape)
    got = jax.grad(lambda x: (lpips.max_pool2(x) * w).sum())(jnp.asarray(x))
    ref = jax.grad(lambda x: (nnx.max_pool(x[:, :6], (2, 2), strides=(2, 2)) * w).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(got, ref)
    assert np.count_nonzero(got) == w.size and not np.any(got[:, 6])
