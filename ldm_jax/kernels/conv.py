"""2-D convolutions through oneDNN on a single-device CPU backend.

XLA:CPU's own convolutions (Eigen) ran at 0.52-0.87x of the oneDNN kernels
that PyTorch uses on the same CPU, their weight gradients often lowest
(bench/README.md, rounds 4, 15 and 16): on this project's CPU recipe they were
most of the train step. `conv_general_dilated` has `lax.conv_general_dilated`'s
signature, so it drops into `nnx.Conv(conv_general_dilated=...)` (parameters
and checkpoints unchanged), and sends the convolutions oneDNN covers to the
three XLA FFI handlers of `onednn_conv.cc` (forward, input gradient, weight
gradient, joined by a custom VJP). Everything else goes to XLA as before:

* other platforms: the choice is made per platform when the program is
  lowered (`lax.platform_dependent`), so GPU and TPU programs never see the
  custom call;
* several devices (the fake CPU devices of the tests, multi-host CPU runs):
  XLA's SPMD partitioner cannot split a custom call by batch, so it would
  gather the whole batch on every device;
* anything but float32 NHWC x HWIO, ungrouped, undilated convolutions.

The handlers are compiled on first use from `onednn_conv.cc` against the
oneDNN of the `onednn-cpu-gomp` wheels (requirements.txt) and cached under
`$LDM_JAX_CACHE` (default `~/.cache/ldm_jax`). When that is impossible (no
C++ compiler, no oneDNN, not Linux x86-64) the XLA convolution is used and a
warning says why. `LDM_JAX_CONV=xla` turns the kernel off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SOURCE = Path(__file__).with_name("onednn_conv.cc")
_HANDLERS = {
    "ldm_onednn_conv_forward": "LdmOnednnConvForward",
    "ldm_onednn_conv_backward_data": "LdmOnednnConvBackwardData",
    "ldm_onednn_conv_backward_weights": "LdmOnednnConvBackwardWeights",
}
_NHWC = lax.ConvDimensionNumbers(lhs_spec=(0, 3, 1, 2), rhs_spec=(3, 2, 0, 1),
                                 out_spec=(0, 3, 1, 2))


def _onednn_prefix() -> Path:
  """Where pip put the oneDNN wheels' `include/` and `lib/`."""
  return Path(sysconfig.get_paths()["data"])


def _cache_dir() -> Path:
  root = os.environ.get("LDM_JAX_CACHE") or Path.home() / ".cache" / "ldm_jax"
  return Path(root) / "kernels"


def build(source: Path = _SOURCE) -> Path:
  """Compiles the handlers (once per source, jaxlib and oneDNN) and returns
  the shared library's path. Raises `RuntimeError` with the reason if it
  cannot."""
  if platform.system() != "Linux" or platform.machine() != "x86_64":
    raise RuntimeError("the oneDNN wheels exist for Linux x86-64 only")
  prefix = _onednn_prefix()
  header = prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp"
  library = prefix / "lib" / "libdnnl.so"
  if not header.exists() or not library.exists():
    raise RuntimeError(
        f"oneDNN not found under {prefix} (pip install -r requirements.txt "
        "installs onednn-cpu-gomp and onednn-devel-cpu-gomp)")
  compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
  if compiler is None:
    raise RuntimeError("no C++ compiler (c++ or g++, or $CXX)")
  key = hashlib.sha256(
      source.read_bytes() + jax.ffi.include_dir().encode()
      + jax.__version__.encode() + str(library.resolve()).encode()
      + str(library.stat().st_size).encode()).hexdigest()[:16]
  target = _cache_dir() / key / "onednn_conv.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  # Built beside the target and renamed into place, so that processes
  # building at the same time (pytest-xdist) never load a half-written file.
  with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
    partial = Path(tmp) / target.name
    command = [
        compiler, "-O2", "-std=c++17", "-shared", "-fPIC", "-w",
        f"-I{jax.ffi.include_dir()}", f"-I{prefix / 'include'}", str(source),
        f"-L{prefix / 'lib'}", "-ldnnl", f"-Wl,-rpath,{prefix / 'lib'}",
        "-o", str(partial)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
      raise RuntimeError(f"compiling {source.name} failed:\n{result.stderr[-2000:]}")
    os.replace(partial, target)
  return target


_lock = threading.Lock()
_state: dict[str, object] = {}


def kernel_error() -> str | None:
  """None once the handlers are built and registered; otherwise why not.
  Built at most once per process."""
  with _lock:
    if "error" not in _state:
      try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in _HANDLERS.items():
          jax.ffi.register_ffi_target(
              target, jax.ffi.pycapsule(getattr(library, symbol)),
              platform="cpu")
        _state["library"] = library  # keeps the handlers loaded
        _state["error"] = None
      except (RuntimeError, OSError) as error:
        _state["error"] = str(error)
        logging.warning("oneDNN convolutions unavailable, XLA's are used: %s",
                        error)
    return _state["error"]  # type: ignore[return-value]


_override = threading.local()


def enabled() -> bool:
  """Whether CPU convolutions go to oneDNN in programs traced from now on."""
  choice = getattr(_override, "on", None)
  if choice is not None:
    return choice and kernel_error() is None
  if os.environ.get("LDM_JAX_CONV", "onednn") == "xla":
    return False
  # On an accelerator the convolutions are its own: nothing to build.
  if jax.default_backend() != "cpu" or jax.device_count() != 1:
    return False
  return kernel_error() is None


@contextlib.contextmanager
def use_kernel(on: bool):
  """Programs traced inside use the kernel (if it builds) or not, whatever
  the device count and `LDM_JAX_CONV`: for unsharded programs on one of
  several devices (tests), or to count FLOPs without custom calls. The
  choice is made when a function is traced, and jit reuses its traces:
  trace a new function inside, or `jax.clear_caches()` first."""
  previous = getattr(_override, "on", None)
  _override.on = on
  try:
    yield
  finally:
    _override.on = previous


# --- The custom call and its VJP --------------------------------------------

Geometry = tuple[int, int, int, int, int, int]  # strides h, w; pads t, b, l, r


def _attrs(geometry: Geometry) -> dict[str, np.int64]:
  names = ("stride_h", "stride_w", "pad_top", "pad_bottom", "pad_left",
           "pad_right")
  return {n: np.int64(v) for n, v in zip(names, geometry)}


def _call(target: str, shape, a, b, geometry: Geometry):
  out = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.ffi.ffi_call(target, out, vmap_method="sequential")(
      a, b, **_attrs(geometry))


def _output_shape(x_shape, w_shape, geometry: Geometry):
  sh, sw, pt, pb, pl, pr = geometry
  n, h, w, _ = x_shape
  kh, kw, _, o = w_shape
  return (n, (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1, o)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def onednn_conv(x: jax.Array, w: jax.Array, geometry: Geometry) -> jax.Array:
  """NHWC x HWIO -> NHWC float32 convolution by oneDNN (CPU only)."""
  return _call("ldm_onednn_conv_forward",
               _output_shape(x.shape, w.shape, geometry), x, w, geometry)


def _onednn_conv_fwd(x, w, geometry):
  return onednn_conv(x, w, geometry), (x, w)


def _onednn_conv_bwd(geometry, residuals, dy):
  x, w = residuals
  dx = _call("ldm_onednn_conv_backward_data", x.shape, dy, w, geometry)
  dw = _call("ldm_onednn_conv_backward_weights", w.shape, x, dy, geometry)
  return dx, dw


onednn_conv.defvjp(_onednn_conv_fwd, _onednn_conv_bwd)


# --- The drop-in for lax.conv_general_dilated ---------------------------------

def _is_one(values) -> bool:
  return values is None or all(v == 1 for v in np.atleast_1d(values))


def _geometry(lhs, rhs, window_strides, padding) -> Geometry | None:
  strides = tuple(window_strides) if window_strides else (1, 1)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides,
                                  padding)
  (pt, pb), (pl, pr) = padding
  if min(pt, pb, pl, pr) < 0:
    return None
  return (int(strides[0]), int(strides[1]), int(pt), int(pb), int(pl),
          int(pr))


def conv_general_dilated(
    lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
    dimension_numbers=None, feature_group_count=1, batch_group_count=1,
    precision=None, preferred_element_type=None, **kwargs):
  """`lax.conv_general_dilated`, with oneDNN doing the CPU convolutions it
  covers (see the module docstring); same arguments, same result."""
  xla_conv = functools.partial(
      lax.conv_general_dilated, window_strides=window_strides,
      padding=padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type, **kwargs)
  supported = (
      lhs.ndim == 4 and rhs.ndim == 4
      and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
      and preferred_element_type in (None, jnp.float32)
      and feature_group_count == 1 and batch_group_count == 1
      and _is_one(lhs_dilation) and _is_one(rhs_dilation)
      and kwargs.get("out_sharding") is None
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                     dimension_numbers) == _NHWC)
  geometry = _geometry(lhs, rhs, window_strides, padding) if supported else None
  if geometry is None or not enabled():
    return xla_conv(lhs, rhs)
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda x, w: onednn_conv(x, w, geometry),
      default=xla_conv)
