"""Tests for ldm_jax.models: shapes, loss helpers, conditioning, gradients,
argument checks, jit over split state, data-parallel equivalence, and a tiny
VAE that learns.

Models are tiny (widths 8-16) and each is built once per module; compiled
functions are shared between tests so the file stays fast on 2 CPU cores.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from ldm_jax import parallel
from ldm_jax.models import (
    DENOISERS, MLPDenoiser, UNet, VAE, gaussian_kl, make_denoiser, psnr,
    reconstruction_loss)
from ldm_jax.models.layers import (
    AttentionBlock, Dropout, GroupNorm, MultiHeadAttention, dropout_keep_mask, num_groups_for,
    pointwise_conv, timestep_embedding)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  # XLA's CPU optimisation passes dominate this file's run time (tiny models,
  # many distinct programs); without them compiles take about half as long
  # and the numbers checked here do not change. Restored for later modules.
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


BATCH = 8  # one example per fake device
NUM_CLASSES = 10

VAE_SPATIAL = dict(channels=8, channel_multipliers=(1, 2), num_res_blocks=1,
                   latent_channels=4, attention=True)
VAE_VECTOR = dict(channels=8, channel_multipliers=(1, 2, 2), num_res_blocks=1,
                  latent="vector", latent_dim=16)
UNET = dict(latent_shape=(8, 8, 4), num_classes=NUM_CLASSES, channels=8,
            channel_multipliers=(1, 2), num_res_blocks=1, attention_levels=(1,),
            num_heads=2, context_dim=8, context_tokens=2, dropout=0.1)
MLP = dict(latent_shape=(16,), num_classes=NUM_CLASSES, hidden_dim=32,
           num_blocks=2, emb_dim=16, dropout=0.1)


def _rngs(seed: int = 0) -> nnx.Rngs:
  # RBG keys only for building the models: with threefry keys, compiling the
  # initialiser of every distinct parameter shape costs ~30 s of CPU per
  # tiny model on this machine; RBG compiles in a fraction of that. The
  # models themselves do not care which PRNG made their initial weights.
  return nnx.Rngs(jax.random.key(seed, impl="rbg"))


def _param_leaves(tree):
  return jax.tree_util.tree_leaves_with_path(tree)


def _denoiser_inputs(latent_shape, seed=0):
  rng = np.random.default_rng(seed)
  z = rng.standard_normal((BATCH,) + tuple(latent_shape)).astype(np.float32)
  t = rng.integers(1, 1000, BATCH).astype(np.int32)
  labels = rng.integers(0, NUM_CLASSES + 1, BATCH).astype(np.int32)
  return z, t, labels


@functools.cache
def _denoiser(name):
  """(eval-mode graphdef, state, jitted apply) for a tiny denoiser."""
  kwargs = UNET if name == "unet" else MLP
  model = DENOISERS[name](**kwargs, rngs=_rngs())
  graphdef, state = nnx.split(nnx.view(model, deterministic=True))

  @jax.jit
  def apply(state, z, t, labels):
    return nnx.merge(graphdef, state)(z, t, labels)

  return model, state, apply


@functools.cache
def _vae(form):
  model = VAE(**(VAE_SPATIAL if form == "spatial" else VAE_VECTOR),
              rngs=_rngs())
  graphdef, state = nnx.split(model)

  @jax.jit
  def apply(state, x, rng):
    vae = nnx.merge(graphdef, state)
    x_hat, mean, logvar = vae(x, rng)
    return x_hat, mean, logvar, vae.decode(mean)

  return model, state, apply


def _images(batch=BATCH, size=32, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


# ----------------------------------------------------------------- helpers


def test_timestep_embedding_formula():
  t = np.array([0.0, 1.0, 7.5, 999.0], np.float32)
  emb = np.asarray(timestep_embedding(jnp.asarray(t), 6, max_period=100.0))
  freqs = 100.0 ** (-np.arange(3) / 3)
  expected = np.concatenate(
      [np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], axis=-1)
  np.testing.assert_allclose(emb, expected, rtol=1e-5, atol=1e-4)
  odd = timestep_embedding(jnp.asarray(t), 7)
  assert odd.shape == (4, 7)
  np.testing.assert_array_equal(np.asarray(odd[:, -1]), 0.0)


def test_num_groups_for():
  assert num_groups_for(128) == 32
  assert num_groups_for(8) == 8
  assert num_groups_for(48) == 24
  assert 96 % num_groups_for(96) == 0


# ------------------------------------------------------------ VAE losses


def _group_norm_pair(channels, groups, dtype=jnp.float32):
  """Ours and nnx.GroupNorm with the same random scale and bias."""
  rng = np.random.default_rng(1)
  scale = jnp.asarray(1 + 0.3 * rng.standard_normal(channels), jnp.float32)
  bias = jnp.asarray(rng.standard_normal(channels), jnp.float32)
  ours = GroupNorm(channels, num_groups=groups, dtype=dtype, rngs=nnx.Rngs(0))
  reference = nnx.GroupNorm(channels, num_groups=groups, epsilon=1e-6,
                            dtype=dtype, rngs=nnx.Rngs(0))
  for module in (ours, reference):
    module.scale.value, module.bias.value = scale, bias
  return ours, reference


@pytest.mark.parametrize("shape, groups", [((2, 4, 4, 8), 4), ((3, 5, 6), 2),
                                           ((2, 4, 4, 6), 6)])
def test_group_norm_matches_nnx_group_norm(shape, groups):
  ours, reference = _group_norm_pair(shape[-1], groups)
  # An offset larger than the spread: the fast variance must still hold.
  x = jnp.asarray(3.0 + np.random.default_rng(2).standard_normal(shape), jnp.float32)
  np.testing.assert_allclose(ours(x), reference(x), atol=2e-5)
  cotangent = jnp.asarray(np.random.default_rng(3).standard_normal(shape), jnp.float32)

  def grads(module):
    graphdef, params = nnx.split(module)
    loss = lambda params, x: jnp.sum(nnx.merge(graphdef, params)(x) * cotangent)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  (ours_params, ours_x), (ref_params, ref_x) = grads(ours), grads(reference)
  np.testing.assert_allclose(ours_x, ref_x, atol=5e-5)
  for name in ("scale", "bias"):
    np.testing.assert_allclose(ours_params[name].value, ref_params[name].value,
                               rtol=1e-5, atol=5e-5)


def test_group_norm_keeps_nnx_parameters_and_initialisation_keys():
  ours = GroupNorm(8, num_groups=4, rngs=nnx.Rngs(0))
  reference = nnx.GroupNorm(8, num_groups=4, rngs=nnx.Rngs(0))
  ours_state, ref_state = nnx.state(ours, nnx.Param), nnx.state(reference, nnx.Param)
  assert jax.tree.structure(ours_state) == jax.tree.structure(ref_state)
  for a, b in zip(jax.tree.leaves(ours_state), jax.tree.leaves(ref_state)):
    np.testing.assert_array_equal(a, b)
    assert a.dtype == jnp.float32
  # Both draw the same number of parameter keys, so whatever is built after
  # a GroupNorm is initialised exactly as it was with nnx.GroupNorm.
  rngs_ours, rngs_ref = nnx.Rngs(5), nnx.Rngs(5)
  GroupNorm(8, num_groups=4, rngs=rngs_ours)
  nnx.GroupNorm(8, num_groups=4, rngs=rngs_ref)
  np.testing.assert_array_equal(jax.random.key_data(rngs_ours.params()),
                                jax.random.key_data(rngs_ref.params()))
  with pytest.raises(ValueError, match="must divide"):
    GroupNorm(6, num_groups=4, rngs=nnx.Rngs(0))


def test_group_norm_folds_film_modulation():
  ours, _ = _group_norm_pair(8, 4)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 3, 3, 8)), jnp.float32)
  scale, shift = (jnp.asarray(rng.standard_normal((2, 8)), jnp.float32)
                  for _ in range(2))
  expected = ours(x) * (1 + scale[:, None, None, :]) + shift[:, None, None, :]
  np.testing.assert_allclose(ours(x, (scale, shift)), expected, atol=1e-5)


@pytest.mark.parametrize("shape, groups", [((2, 4, 4, 8), 4), ((3, 5, 6), 3)])
@pytest.mark.parametrize("film", [False, True])
@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_gradient_matches_autodiff_of_the_reference(shape, groups, film, silu):
  """The hand-written VJP against autodiff through nnx.GroupNorm, FiLM and
  SiLU, for the map, both parameters and both FiLM inputs."""
  ours, reference = _group_norm_pair(shape[-1], groups)
  rng = np.random.default_rng(6)
  x = jnp.asarray(2.0 + 1.5 * rng.standard_normal(shape), jnp.float32)
  batch, channels = shape[0], shape[-1]
  film_in = tuple(jnp.asarray(0.5 * rng.standard_normal((batch, channels)), jnp.float32)
                  for _ in range(2))
  cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32)
  expand = lambda v: v.reshape((batch,) + (1,) * (len(shape) - 2) + (channels,))

  def loss(module, params, x, film_scale, film_shift, ours_call):
    graphdef = nnx.graphdef(module)
    merged = nnx.merge(graphdef, params)
    if ours_call:
      out = merged(x, (film_scale, film_shift) if film else None, silu=silu)
    else:
      out = merged(x)
      if film:
        out = out * (1 + expand(film_scale)) + expand(film_shift)
      out = jax.nn.silu(out) if silu else out
    return jnp.sum(out * cotangent)

  grads = {}
  for name, module, ours_call in (("ours", ours, True), ("ref", reference, False)):
    params = nnx.state(module)
    grads[name] = jax.grad(loss, argnums=(1, 2, 3, 4))(module, params, x, *film_in, ours_call)
  (ours_params, *ours_rest), (ref_params, *ref_rest) = grads["ours"], grads["ref"]
  for got, want in zip(ours_rest, ref_rest):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  for name in ("scale", "bias"):
    want = ref_params[name].value
    np.testing.assert_allclose(ours_params[name].value, want, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want).max()))
  if not film:  # No FiLM: its inputs get no gradient at all.
    assert not np.any(ours_rest[1]) and not np.any(ours_rest[2])


def test_group_norm_gradient_keeps_the_input_dtype_under_bfloat16():
  ours, _ = _group_norm_pair(8, 4, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(7).standard_normal((2, 3, 3, 8)), jnp.bfloat16)
  graphdef, params = nnx.split(ours)
  grad_params, grad_x = jax.grad(
      lambda p, x: jnp.sum(nnx.merge(graphdef, p)(x, silu=True).astype(jnp.float32)),
      argnums=(0, 1))(params, x)
  assert grad_x.dtype == jnp.bfloat16
  assert grad_params["scale"].value.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(grad_x, np.float32)))


def test_group_norm_statistics_stay_float32_under_bfloat16():
  ours, reference = _group_norm_pair(8, 4, dtype=jnp.bfloat16)
  # A large offset: bf16 statistics would lose the spread around it.
  x = jnp.asarray(20.0 + np.random.default_rng(5).standard_normal((2, 4, 4, 8)),
                  jnp.bfloat16)
  out = ours(x)
  assert out.dtype == jnp.bfloat16 and ours.scale.value.dtype == jnp.float32
  exact, _ = _group_norm_pair(8, 4)
  np.testing.assert_allclose(out.astype(jnp.float32), exact(x.astype(jnp.float32)),
                             atol=0.05)
  np.testing.assert_allclose(out.astype(jnp.float32),
                             reference(x).astype(jnp.float32), atol=0.05)


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keep_mask_rate_and_independence(rate):
  shape = (16, 8, 8, 32)  # 32,768 elements
  masks = [np.asarray(dropout_keep_mask(jax.random.key(k), shape, rate))
           for k in range(3)]
  keep = 1.0 - rate
  tolerance = 4 * np.sqrt(keep * rate / masks[0].size)  # 4 standard errors
  for mask in masks:
    assert mask.shape == shape and mask.dtype == bool
    assert abs(mask.mean() - keep) < tolerance
  # Independent across keys: two masks agree as often as two independent
  # Bernoulli draws would.
  agreement = (masks[0] == masks[1]).mean()
  assert abs(agreement - (keep ** 2 + rate ** 2)) < 2 * tolerance
  # ... and across neighbouring elements (consecutive indices), along the
  # channels and along the batch.
  flat = masks[2].reshape(-1).astype(np.float64)
  assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.03
  per_example = masks[2].reshape(shape[0], -1).astype(np.float64)
  assert abs(np.corrcoef(per_example[0], per_example[1])[0, 1]) < 0.1


def test_dropout_keep_mask_is_the_same_when_sharded():
  mesh = parallel.make_mesh()
  shape = (len(mesh.devices.flat) * 2, 4, 4, 8)
  sharding = jax.sharding.NamedSharding(
      mesh, jax.sharding.PartitionSpec(parallel.DATA_AXIS))
  make = lambda key: dropout_keep_mask(key, shape, 0.3)
  key = jax.random.key(3)
  sharded = jax.jit(make, out_shardings=sharding)(key)
  assert len(sharded.sharding.device_set) == len(mesh.devices.flat)
  np.testing.assert_array_equal(np.asarray(sharded), np.asarray(jax.jit(make)(key)))


def test_dropout_scales_kept_values_and_keeps_nnx_state():
  x = jnp.arange(1.0, 4097.0).reshape(4, 32, 32)
  ours = Dropout(0.25, rngs=nnx.Rngs(dropout=4))
  reference = nnx.Dropout(0.25, rngs=nnx.Rngs(dropout=4))
  assert jax.tree.structure(nnx.state(ours)) == jax.tree.structure(nnx.state(reference))
  out = np.asarray(ours(x, deterministic=False))
  kept = out != 0
  np.testing.assert_allclose(out[kept], np.asarray(x)[kept] / 0.75, rtol=1e-6)
  assert 0.7 < kept.mean() < 0.8
  again = np.asarray(ours(x, deterministic=False))  # The stream advances.
  assert (again != out).any()
  np.testing.assert_array_equal(ours(x, deterministic=True), x)
  np.testing.assert_array_equal(Dropout(0.0, rngs=nnx.Rngs(0))(x, deterministic=False), x)
  np.testing.assert_array_equal(Dropout(1.0, rngs=nnx.Rngs(0))(x, deterministic=False), 0 * x)
  # broadcast_dims share one mask along those axes.
  shared = np.asarray(Dropout(0.5, broadcast_dims=(1,), rngs=nnx.Rngs(1))(
      x, deterministic=False)) != 0
  assert (shared == shared[:, :1, :]).all()
  with pytest.raises(ValueError, match="deterministic"):
    Dropout(0.5, deterministic=None, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pointwise_conv_is_the_1x1_conv(dtype):
  conv = nnx.Conv(6, 5, (1, 1), dtype=dtype, rngs=_rngs())
  conv.bias[...] = jnp.arange(5.0)  # A zero bias would not show a missing add.
  x = jax.random.normal(jax.random.key(1), (2, 3, 4, 6))
  rows = pointwise_conv(conv, x.reshape(-1, 6))
  assert rows.dtype == dtype
  tolerance = 1e-5 if dtype == jnp.float32 else 3e-2
  np.testing.assert_allclose(np.asarray(rows.reshape(2, 3, 4, 5), np.float32),
                             np.asarray(conv(x), np.float32), rtol=tolerance, atol=tolerance)
  with pytest.raises(ValueError, match="1x1"):
    pointwise_conv(nnx.Conv(6, 5, (3, 3), rngs=_rngs()), x.reshape(-1, 6))
  with pytest.raises(ValueError, match="1x1"):
    pointwise_conv(nnx.Conv(6, 5, (1, 1), strides=2, rngs=_rngs()), x.reshape(-1, 6))


def _attention_block_reference(block, x, context):
  """The block written out over (B, T, C) tokens with its own modules, as a
  transformer block reads: the independent check of the row-wise version."""
  def attend(mha, queries, keys):
    def heads(y):
      return y.reshape(y.shape[:2] + (mha.num_heads, -1)).transpose(0, 2, 1, 3)
    q, k, v = heads(mha.query(queries)), heads(mha.key(keys)), heads(mha.value(keys))
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]), axis=-1)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(queries.shape)
    return mha.out(attended)

  batch, height, width, channels = x.shape
  h = block.proj_in(block.norm(x)).reshape(batch, height * width, channels)
  normed = block.self_norm(h)
  h = h + attend(block.self_attn, normed, normed)
  h = h + attend(block.cross_attn, block.cross_norm(h), context)
  if block.mlp_in is not None:
    h = h + block.mlp_out(jax.nn.gelu(block.mlp_in(block.mlp_norm(h))))
  return x + block.proj_out(h.reshape(x.shape))


@pytest.mark.parametrize("mlp_ratio", [4, 0])
def test_attention_block_matches_its_written_out_form(mlp_ratio):
  block = AttentionBlock(16, num_heads=2, context_dim=8, mlp_ratio=mlp_ratio, rngs=_rngs())
  for layer in (block.proj_in, block.proj_out):  # Non-zero biases, so a lost add shows.
    layer.bias[...] = jax.random.normal(jax.random.key(2), layer.bias.shape)
  x = jax.random.normal(jax.random.key(3), (2, 4, 4, 16))
  context = jax.random.normal(jax.random.key(4), (2, 3, 8))
  out, expected = block(x, context), _attention_block_reference(block, x, context)
  assert out.shape == x.shape
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), rtol=1e-5, atol=1e-5)
  assert float(jnp.max(jnp.abs(out - x))) > 1e-2  # The block does something.


@pytest.mark.parametrize("context_tokens", [3, 9])  # 3 tokens, 2 heads x 3 < 16: folded; 9: direct.
def test_cross_attention_matches_written_out_form_with_gradients(context_tokens, monkeypatch):
  mha = MultiHeadAttention(16, num_heads=2, context_features=8, rngs=_rngs())
  unused = "_direct" if context_tokens < 5 else "_through_few_tokens"  # 5 queries.

  def fail(*args):
    raise AssertionError(f"{unused} ran")

  monkeypatch.setattr(MultiHeadAttention, unused, fail)
  for layer in (mha.query, mha.value, mha.out):  # Non-zero biases: the folded form
    layer.bias[...] = jax.random.normal(jax.random.key(5), layer.bias.shape)  # moves them.
  queries = jax.random.normal(jax.random.key(6), (2, 5, 16))
  context = jax.random.normal(jax.random.key(7), (2, context_tokens, 8))

  def written_out(params, queries, context):
    def heads(y):
      return y.reshape(y.shape[:2] + (2, -1)).transpose(0, 2, 1, 3)
    q = heads(queries @ params["query"]["kernel"] + params["query"]["bias"])
    k = heads(context @ params["key"]["kernel"])
    v = heads(context @ params["value"]["kernel"] + params["value"]["bias"])
    weights = jax.nn.softmax(q @ k.transpose(0, 1, 3, 2) / np.sqrt(8), axis=-1)
    attended = (weights @ v).transpose(0, 2, 1, 3).reshape(queries.shape)
    return attended @ params["out"]["kernel"] + params["out"]["bias"]

  graphdef, params = nnx.split(mha)

  def through_module(params, queries, context):
    return nnx.merge(graphdef, params)(queries, context)

  raw = nnx.to_pure_dict(params)
  np.testing.assert_allclose(np.asarray(through_module(params, queries, context)),
                             np.asarray(written_out(raw, queries, context)),
                             rtol=1e-5, atol=1e-5)
  cotangent = jax.random.normal(jax.random.key(8), queries.shape)
  ours = jax.grad(lambda p, q, c: jnp.sum(through_module(p, q, c) * cotangent),
                  argnums=(0, 1, 2))(params, queries, context)
  reference = jax.grad(lambda p, q, c: jnp.sum(written_out(p, q, c) * cotangent),
                       argnums=(0, 1, 2))(raw, queries, context)
  for got, want in zip(jax.tree.leaves(nnx.to_pure_dict(ours[0])) + list(ours[1:]),
                       jax.tree.leaves(reference[0]) + list(reference[1:])):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
  bf16 = MultiHeadAttention(16, num_heads=2, context_features=8, dtype=jnp.bfloat16,
                            rngs=_rngs())
  nnx.update(bf16, params)
  out = bf16(queries, context)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(written_out(raw, queries, context)), rtol=5e-2, atol=5e-2)


def test_gaussian_kl_standard_normal_is_zero():
  zeros = jnp.zeros((3, 4, 4, 2))
  np.testing.assert_allclose(np.asarray(gaussian_kl(zeros, zeros)), 0.0,
                             atol=1e-7)


def test_gaussian_kl_matches_numpy_and_is_positive():
  rng = np.random.default_rng(1)
  mean = rng.standard_normal((5, 16)).astype(np.float32)
  logvar = rng.uniform(-2, 2, (5, 16)).astype(np.float32)
  # KL(N(m, s^2) || N(0, 1)) = log(1/s) + (s^2 + m^2) / 2 - 1/2, per dim.
  sigma = np.exp(0.5 * logvar)
  expected = (-np.log(sigma) + (sigma**2 + mean**2) / 2 - 0.5).sum(-1)
  kl = np.asarray(gaussian_kl(jnp.asarray(mean), jnp.asarray(logvar)))
  assert kl.shape == (5,)
  np.testing.assert_allclose(kl, expected, rtol=1e-5)
  assert (kl > 0).all()


def test_reconstruction_loss_kinds():
  rng = np.random.default_rng(2)
  x = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  x_hat = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  l1 = reconstruction_loss(jnp.asarray(x_hat), jnp.asarray(x), "l1")
  l2 = reconstruction_loss(jnp.asarray(x_hat), jnp.asarray(x), "l2")
  np.testing.assert_allclose(
      np.asarray(l1), np.abs(x_hat - x).mean((1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(l2), ((x_hat - x) ** 2).mean((1, 2, 3)), rtol=1e-5)
  with pytest.raises(ValueError, match="l1"):
    reconstruction_loss(jnp.asarray(x_hat), jnp.asarray(x), "huber")


def test_psnr():
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (4, 8, 8, 3)).astype(np.float32)
  assert np.isinf(np.asarray(psnr(jnp.asarray(x), jnp.asarray(x)))).all()
  # Out-of-range predictions are clipped before the error is measured.
  x_hat = x + rng.normal(0, 0.3, x.shape).astype(np.float32) + 0.5
  unit = lambda a: (np.clip(a, -1, 1) + 1) / 2
  mse = ((unit(x_hat) - unit(x)) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(
      np.asarray(psnr(jnp.asarray(x_hat), jnp.asarray(x))),
      10 * np.log10(1.0 / mse), rtol=1e-5)
  # A uniform error of 0.2 in [-1, 1] is 0.1 on [0, 1]: MSE 0.01 -> 20 dB.
  zeros = jnp.zeros((1, 4, 4, 3))
  np.testing.assert_allclose(
      np.asarray(psnr(zeros + 0.2, zeros)), [20.0], rtol=1e-5)


# ------------------------------------------------------------------- VAE


@pytest.mark.parametrize("form, latent_shape", [
    ("spatial", (16, 16, 4)), ("vector", (16,))])
def test_vae_shapes_and_round_trip(form, latent_shape):
  model, state, apply = _vae(form)
  assert model.latent_shape == latent_shape
  x = _images()
  x_hat, mean, logvar, decoded_mean = apply(state, x, jax.random.key(0))
  assert x_hat.shape == x.shape
  assert mean.shape == logvar.shape == (BATCH,) + latent_shape
  assert decoded_mean.shape == x.shape
  assert np.isfinite(np.asarray(x_hat)).all()
  # The posterior sample differs from its mean: the noise is really used.
  assert not np.allclose(np.asarray(x_hat), np.asarray(decoded_mean))


def test_vae_sampling_follows_rng():
  _, state, apply = _vae("spatial")
  x = _images()
  a = apply(state, x, jax.random.key(1))[0]
  b = apply(state, x, jax.random.key(1))[0]
  c = apply(state, x, jax.random.key(2))[0]
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("kwargs, match", [
    (dict(latent="pixels"), "latent"),
    (dict(image_size=30, channel_multipliers=(1, 2, 2)), "divisible"),
    (dict(channel_multipliers=()), "channel_multipliers"),
    (dict(num_res_blocks=0), "num_res_blocks"),
    (dict(latent_channels=0), "latent_channels"),
])
def test_vae_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    VAE(**{**VAE_SPATIAL, **kwargs}, rngs=_rngs())


def test_vae_gradients_at_init_and_learning():
  """Every parameter gets a finite nonzero gradient at init, and 30 Adam
  steps on one fixed batch at least halve the reconstruction loss."""
  model, _, _ = _vae("spatial")  # the spatial VAE also has attention
  graphdef, params = nnx.split(model, nnx.Param)
  optimizer = optax.adam(3e-3)
  # Random pixels would be incompressible; 4x4 random blocks upsampled to
  # 8x8 are smooth enough to learn quickly. The spatial VAE is fully
  # convolutional, so 8x8 inputs keep the 30 steps cheap.
  x = jnp.asarray(
      _images(batch=4, size=4, seed=5).repeat(2, axis=1).repeat(2, axis=2))

  def loss_fn(params, rng):
    x_hat, mean, logvar = nnx.merge(graphdef, params)(x, rng)
    return (reconstruction_loss(x_hat, x, "l2")
            + 1e-4 * gaussian_kl(mean, logvar)).mean()

  @jax.jit
  def train(params):
    def step(carry, rng):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, rng)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      grad_max = jax.tree.map(lambda g: jnp.abs(g).max(), grads)
      return (optax.apply_updates(params, updates), opt_state), (
          loss, grad_max)
    _, (losses, grad_max) = jax.lax.scan(
        step, (params, optimizer.init(params)),
        jax.random.split(jax.random.key(0), 30))
    return losses, grad_max

  losses, grad_max = train(params)
  for path, g in _param_leaves(grad_max):
    g0 = float(g[0])  # the gradient at initialisation
    assert np.isfinite(g0) and g0 > 0, jax.tree_util.keystr(path)
  losses = np.asarray(losses)
  assert np.isfinite(losses).all()
  assert losses[-5:].mean() < 0.5 * losses[:5].mean(), losses


# ------------------------------------------------------------- denoisers


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_denoiser_shape_and_conditioning(name):
  model, state, apply = _denoiser(name)
  z, t, labels = _denoiser_inputs(model.latent_shape)
  # Rows 0..3 share z; they differ only in class, null class or time.
  z[:4] = z[0]
  t[:4] = [10, 10, 10, 500]
  labels[:4] = [3, 7, NUM_CLASSES, 3]
  out = np.asarray(apply(state, z, t, labels))
  assert out.shape == z.shape
  assert np.isfinite(out).all()
  assert not np.allclose(out[0], out[1]), "output ignores the class"
  assert not np.allclose(out[0], out[2]), "null class same as class 3"
  assert not np.allclose(out[0], out[3]), "output ignores the time"
  # Eval mode is deterministic.
  np.testing.assert_array_equal(out, np.asarray(apply(state, z, t, labels)))


@pytest.mark.parametrize("name", ["unet", "mlp"])
def test_denoiser_train_mode_gradients(name):
  """In train mode (dropout on) every parameter gets a finite nonzero
  gradient at init, and the dropout masks change from call to call."""
  model, _, _ = _denoiser(name)
  graphdef, params, rest = nnx.split(
      nnx.view(model, deterministic=False), nnx.Param, ...)
  z, t, labels = _denoiser_inputs(model.latent_shape)

  @jax.jit
  def grad_fn(params, rest):
    def loss_fn(params):
      # copy=True: fresh Variables at this trace level. Reusing the ones
      # built by jit's unflattening would make the dropout RNG update a
      # cross-trace mutation (flax.errors.TraceContextError).
      denoiser = nnx.merge(graphdef, params, rest, copy=True)
      loss = jnp.mean((denoiser(z, t, labels) - z) ** 2)
      # The dropout RNG counters advanced; hand them back, as a train step
      # must, or every step would reuse the same masks.
      return loss, nnx.state(denoiser, nnx.Not(nnx.Param))
    return jax.grad(loss_fn, has_aux=True)(params)

  grads, new_rest = grad_fn(params, rest)
  for path, g in _param_leaves(grads):
    g = np.asarray(g)
    assert np.isfinite(g).all(), path
    assert np.abs(g).max() > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
  grads_again, _ = grad_fn(params, new_rest)
  assert not all(
      np.allclose(np.asarray(a), np.asarray(b)) for a, b in
      zip(jax.tree.leaves(grads), jax.tree.leaves(grads_again))), (
          "new dropout masks should change the gradients")


@pytest.mark.parametrize("name", ["unet", "vae"])
def test_sharded_batch_matches_unsharded(name):
  mesh = parallel.make_mesh()
  assert mesh.devices.size == BATCH
  if name == "unet":
    model, state, apply = _denoiser("unet")
    inputs = _denoiser_inputs(model.latent_shape, seed=7)
  else:
    model, state, apply = _vae("spatial")
    inputs = (_images(seed=7), jax.random.key(3))
  expected = apply(state, *inputs)
  batch_inputs = parallel.shard_batch(mesh, inputs[:3] if name == "unet"
                                      else inputs[:1])
  sharded_inputs = tuple(batch_inputs) + tuple(inputs[len(batch_inputs):])
  got = apply(parallel.replicate(mesh, state), *sharded_inputs)
  for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    assert g.sharding.is_equivalent_to(parallel.batch_sharding(mesh), g.ndim)
    np.testing.assert_allclose(np.asarray(e), parallel.gather_to_host(g),
                               rtol=1e-4, atol=1e-5)


def test_make_denoiser():
  model = make_denoiser("mlp", latent_shape=[12], num_classes=3,
                        rngs=_rngs(), hidden_dim=8, num_blocks=1,
                        emb_dim=8)
  assert isinstance(model, MLPDenoiser)
  assert model.latent_shape == (12,)
  assert set(DENOISERS) == {"unet", "mlp"}
  assert DENOISERS["unet"] is UNet
  with pytest.raises(ValueError, match="mlp.*unet"):
    make_denoiser("dit", latent_shape=(4,), num_classes=3, rngs=_rngs())


@pytest.mark.parametrize("kwargs, match", [
    (dict(latent_shape=(128,)), "spatial"),
    (dict(latent_shape=(6, 6, 4), channel_multipliers=(1, 2, 2)), "divisible"),
    (dict(attention_levels=(2,)), "attention_levels"),
    (dict(num_heads=3), "num_heads"),
    (dict(dropout=1.0), "dropout"),
    (dict(num_classes=0), "num_classes"),
    (dict(attention_mlp_ratio=-1), "attention_mlp_ratio"),
])
def test_unet_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    UNet(**{**UNET, **kwargs}, rngs=_rngs())


def test_unet_attention_blocks_without_their_mlp():
  def count(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))

  # The default is ADM's block, without an MLP; 4 gives latent diffusion's.
  with_mlp, lean = UNet(**UNET, attention_mlp_ratio=4, rngs=_rngs()), UNet(**UNET, rngs=_rngs())
  assert with_mlp.mid_attn.mlp_in is not None and lean.mid_attn.mlp_in is None
  width = UNET["channels"] * UNET["channel_multipliers"][-1]
  # Each attention block (one per res block at level 1, three there in all, and
  # the middle one) loses its 4x MLP: two weights and two biases.
  per_block = 2 * 4 * width * width + 4 * width + width + width * 2  # + its LayerNorm
  assert count(with_mlp) - count(lean) == 4 * per_block
  z, t, labels = _denoiser_inputs(UNET["latent_shape"])
  lean.eval()
  out = lean(z, t, labels)
  assert out.shape == z.shape and np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("kwargs, match", [
    (dict(latent_shape=()), "latent_shape"),
    (dict(hidden_dim=0), "hidden_dim"),
    (dict(dropout=-0.1), "dropout"),
])
def test_mlp_rejects_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    MLPDenoiser(**{**MLP, **kwargs}, rngs=_rngs())


@pytest.mark.parametrize("build", [
    lambda **kw: VAE(**VAE_SPATIAL, **kw, rngs=_rngs()),
    lambda **kw: UNet(**UNET, **kw, rngs=_rngs()),
], ids=["vae", "unet"])
def test_norm_groups_caps_the_groups_of_every_group_norm(build):
  def groups(model):
    return sorted({(m.scale.shape[0], m.num_groups) for _, m in nnx.iter_graph(model)
                   if isinstance(m, GroupNorm)})

  # By default each GroupNorm takes up to 32 groups: at these widths (8 and
  # 16 channels) one channel per group, an instance norm.
  assert all(channels == count for channels, count in groups(build()))
  capped = groups(build(norm_groups=2))
  assert {count for _, count in capped} == {2}
  assert {channels for channels, _ in capped} == {channels for channels, _ in groups(build())}
