"""The oneDNN convolution kernel against XLA's, and when it is (not) used."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from ldm_jax import models
from ldm_jax.kernels import conv as conv_kernels

NHWC = ("NHWC", "HWIO", "NHWC")


@pytest.fixture(scope="module")
def kernel():
  error = conv_kernels.kernel_error()
  if error is not None:
    pytest.skip(f"oneDNN kernel not buildable here: {error}")


def xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=NHWC,
                                  precision=lax.Precision.HIGHEST)


def relative_error(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize("shape,kernel_shape,strides,padding", [
    ((2, 8, 8, 16), (3, 3, 16, 24), (1, 1), "SAME"),
    ((2, 8, 8, 16), (3, 3, 16, 16), (2, 2), "SAME"),       # pads (0, 1)
    ((3, 7, 5, 8), (1, 1, 8, 12), (1, 1), "VALID"),
    ((1, 6, 9, 4), (3, 3, 4, 6), (1, 2), ((2, 0), (1, 3))),
])
def test_onednn_conv_matches_xla_values_and_gradients(
    kernel, shape, kernel_shape, strides, padding):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, kernel_shape) / np.sqrt(np.prod(kernel_shape[:3]))

  def ours(x, w):
    return conv_kernels.conv_general_dilated(
        x, w, strides, padding, dimension_numbers=NHWC)

  reference = lambda x, w: xla_conv(x, w, strides, padding)
  expected = reference(x, w)
  with conv_kernels.use_kernel(True):
    got = jax.jit(ours)(x, w)
    cotangent = jax.random.normal(kg, expected.shape)
    _, vjp = jax.vjp(jax.jit(ours), x, w)
    dx, dw = vjp(cotangent)
    hlo = jax.jit(ours).lower(x, w).as_text()
  assert "ldm_onednn_conv_forward" in hlo
  assert got.shape == expected.shape
  assert relative_error(got, expected) < 1e-5
  _, reference_vjp = jax.vjp(reference, x, w)
  dx_expected, dw_expected = reference_vjp(cotangent)
  assert relative_error(dx, dx_expected) < 1e-5
  assert relative_error(dw, dw_expected) < 1e-5


def test_conv_stays_with_xla_where_the_kernel_does_not_apply(kernel):
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 4))
  cases = {
      "bfloat16": (x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), {}),
      "grouped": (x, jnp.ones((3, 3, 2, 4)), {"feature_group_count": 2}),
      "dilated": (x, w, {"rhs_dilation": (2, 2)}),
      "NCHW": (jnp.ones((2, 4, 8, 8)), jnp.ones((4, 4, 3, 3)),
               {"dimension_numbers": ("NCHW", "OIHW", "NCHW")}),
  }
  with conv_kernels.use_kernel(True):
    for name, (lhs, rhs, kwargs) in cases.items():
      kwargs = {"dimension_numbers": NHWC, **kwargs}
      fn = lambda a, b: conv_kernels.conv_general_dilated(
          a, b, (1, 1), "SAME", **kwargs)
      hlo = jax.jit(fn).lower(lhs, rhs).as_text()
      assert "ldm_onednn" not in hlo, name
      np.testing.assert_array_equal(
          fn(lhs, rhs),
          lax.conv_general_dilated(lhs, rhs, (1, 1), "SAME", **kwargs))


def test_kernel_is_off_with_several_devices_or_when_asked(kernel, monkeypatch):
  # This session has 8 fake CPU devices: a custom call cannot be split by
  # batch across them, so the kernel must stay off.
  assert jax.device_count() > 1
  assert not conv_kernels.enabled()
  with conv_kernels.use_kernel(True):
    assert conv_kernels.enabled()
    with conv_kernels.use_kernel(False):
      assert not conv_kernels.enabled()
    assert conv_kernels.enabled()
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  assert conv_kernels.enabled()
  monkeypatch.setenv("LDM_JAX_CONV", "xla")
  assert not conv_kernels.enabled()


def test_other_platforms_never_see_the_custom_call(kernel):
  x = jnp.ones((2, 8, 8, 4))
  w = jnp.ones((3, 3, 4, 8))
  fn = lambda a, b: conv_kernels.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=NHWC)
  # Export checks custom calls for stability guarantees; ours are local.
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(target)
               for target in conv_kernels._HANDLERS]
  with conv_kernels.use_kernel(True):
    exported = jax.export.export(jax.jit(fn), platforms=("cpu", "cuda"),
                                 disabled_checks=unchecked)(x, w)
    cuda_only = jax.export.export(jax.jit(fn), platforms=("cuda",))(x, w)
  assert "ldm_onednn_conv_forward" in exported.mlir_module()
  assert "ldm_onednn_conv_forward" not in cuda_only.mlir_module()
  assert "convolution" in cuda_only.mlir_module()


def test_unet_loss_and_gradients_agree_with_xla_convolutions(kernel):
  model = models.UNet(latent_shape=(8, 8, 4), num_classes=10, channels=16,
                      channel_multipliers=(1, 2), num_res_blocks=1,
                      attention_levels=(1,), num_heads=2, context_dim=16,
                      dropout=0.0, rngs=nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  kx, kt = jax.random.split(jax.random.key(1))
  z = jax.random.normal(kx, (4, 8, 8, 4))
  t = jax.random.randint(kt, (4,), 0, 1000)
  labels = jnp.arange(4)

  def loss(params):
    out = nnx.merge(graphdef, params, rest)(z, t, labels)
    return jnp.mean(out ** 2)

  expected, expected_grads = jax.jit(jax.value_and_grad(loss))(params)
  with conv_kernels.use_kernel(True):
    lowered = jax.jit(jax.value_and_grad(loss)).lower(params).as_text()
    got, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert "ldm_onednn_conv_backward_weights" in lowered
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # Tolerance relative to the largest gradient: some gradients are zero up to
  # rounding (a bias right before a GroupNorm), so per-leaf scales mislead.
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(expected_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(expected_grads)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)


def test_build_reports_why_it_cannot_compile(tmp_path, monkeypatch):
  monkeypatch.setenv("LDM_JAX_CACHE", str(tmp_path))
  monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
  if conv_kernels._onednn_prefix().joinpath("lib", "libdnnl.so").exists():
    with pytest.raises(RuntimeError, match="compiling onednn_conv.cc failed"):
      conv_kernels.build()
  else:
    with pytest.raises(RuntimeError, match="oneDNN not found"):
      conv_kernels.build()
  assert not list(tmp_path.rglob("*.so"))


def test_fid_features_agree_with_xla_convolutions(kernel):
  # Random weights (the real ones may be absent): every one of the Inception's
  # convolution shapes (1x1 to 7x1, strides 1 and 2, explicit padding) runs.
  from ldm_jax import parallel
  from ldm_jax.fid import weights as weights_lib
  from ldm_jax.fid import extractor
  rng = np.random.default_rng(0)
  params = {}
  for name, shape in weights_lib.expected_param_shapes().items():
    if name.endswith("/kernel"):  # He-scaled, so activations stay O(1)
      value = rng.normal(size=shape) * np.sqrt(2 / np.prod(shape[:-1]))
    elif name.endswith("/var"):
      value = rng.uniform(0.5, 2.0, shape)
    else:
      value = rng.normal(size=shape) * 0.1
    params[name] = value.astype(np.float32)
  model = extractor.FIDModel(params, mesh=parallel.make_mesh(1))
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  # The extractor's jitted function is module-level: its trace cache must be
  # dropped whenever the kernel choice changes.
  jax.clear_caches()
  try:
    with conv_kernels.use_kernel(False):
      expected = model.features(images, progress=False)
    jax.clear_caches()
    with conv_kernels.use_kernel(True):
      got = model.features(images, progress=False)
      batch = jnp.asarray(images)
      hlo = extractor._features.lower(model._graphdef, model._state, batch).as_text()
  finally:
    jax.clear_caches()
  assert hlo.count("ldm_onednn_conv_forward") == 94  # every convolution
  assert np.isfinite(expected).all() and np.abs(expected).max() > 0
  np.testing.assert_allclose(got, expected, rtol=1e-4,
                             atol=1e-5 * np.abs(expected).max())
