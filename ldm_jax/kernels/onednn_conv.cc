// oneDNN 2-D convolutions for XLA:CPU, as XLA FFI handlers.
//
// Three float32 handlers, all on NHWC maps and HWIO kernels (the layout of
// flax's `nnx.Conv`), with explicit strides and padding:
//   ldm_onednn_conv_forward         (x, w)  -> y
//   ldm_onednn_conv_backward_data   (dy, w) -> dx
//   ldm_onednn_conv_backward_weights (x, dy) -> dw
// `ldm_jax/kernels/conv.py` builds this file, registers the handlers and
// wraps them in a custom VJP. Maps stay NHWC in memory; kernels are reordered
// into whatever blocked layout oneDNN picks for the shape (format `any`),
// which is what makes its convolutions faster than a plain-layout kernel.
//
// Primitives are built once per shape and kept: building one costs about as
// much as running a small convolution.

#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;
using Dt = memory::data_type;

// Shapes of one convolution: input NHWC, kernel HWIO, output NHWC.
struct ConvShape {
  int64_t n, h, w, c;        // input
  int64_t kh, kw, o;         // kernel (HWIO: kh, kw, c, o)
  int64_t oh, ow;            // output
  int64_t sh, sw;            // strides
  int64_t pt, pb, pl, pr;    // padding: top, bottom, left, right

  std::string Key(char kind) const {
    std::string key(1, kind);
    for (int64_t v : {n, h, w, c, kh, kw, o, oh, ow, sh, sw, pt, pb, pl, pr}) {
      key += ',';
      key += std::to_string(v);
    }
    return key;
  }
  memory::desc Input(Tag tag) const { return {{n, c, h, w}, Dt::f32, tag}; }
  memory::desc Output(Tag tag) const { return {{n, o, oh, ow}, Dt::f32, tag}; }
  memory::desc Kernel(Tag tag) const { return {{o, c, kh, kw}, Dt::f32, tag}; }
  memory::dims Strides() const { return {sh, sw}; }
  memory::dims PadLo() const { return {pt, pl}; }
  memory::dims PadHi() const { return {pb, pr}; }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// Scratchpads are the caller's (one per thread), so that a primitive may run
// on several XLA threads at once.
dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const ConvShape& s) {
  return dnnl::convolution_forward::primitive_desc(
      Engine(), dnnl::prop_kind::forward_training,
      dnnl::algorithm::convolution_direct, s.Input(Tag::nhwc),
      s.Kernel(Tag::any), s.Output(Tag::nhwc), s.Strides(), s.PadLo(),
      s.PadHi(), UserScratchpad());
}

// The two backward primitives take the same arguments, and the forward's
// descriptor as a hint.
template <typename Primitive>
typename Primitive::primitive_desc BackwardDesc(
    const ConvShape& s, const dnnl::convolution_forward::primitive_desc& fwd) {
  return typename Primitive::primitive_desc(
      Engine(), dnnl::algorithm::convolution_direct, s.Input(Tag::nhwc),
      s.Kernel(Tag::any), s.Output(Tag::nhwc), s.Strides(), s.PadLo(),
      s.PadHi(), fwd, UserScratchpad());
}

// One built convolution: its primitive, and the reorders that move the kernel
// between HWIO and the primitive's own layout.
struct Plan {
  dnnl::primitive conv;
  memory::desc kernel_desc;  // the primitive's kernel layout
  memory::desc scratch_desc;
  std::unique_ptr<dnnl::reorder> kernel_reorder;  // null when layouts agree
};

std::unique_ptr<Plan> BuildPlan(char kind, const ConvShape& s) {
  auto plan = std::make_unique<Plan>();
  auto fwd = ForwardDesc(s);
  memory::desc hwio = s.Kernel(Tag::hwio);
  if (kind == 'f') {
    plan->conv = dnnl::convolution_forward(fwd);
    plan->kernel_desc = fwd.weights_desc();
    plan->scratch_desc = fwd.scratchpad_desc();
  } else if (kind == 'd') {
    auto pd = BackwardDesc<dnnl::convolution_backward_data>(s, fwd);
    plan->conv = dnnl::convolution_backward_data(pd);
    plan->kernel_desc = pd.weights_desc();
    plan->scratch_desc = pd.scratchpad_desc();
  } else {
    auto pd = BackwardDesc<dnnl::convolution_backward_weights>(s, fwd);
    plan->conv = dnnl::convolution_backward_weights(pd);
    plan->kernel_desc = pd.diff_weights_desc();
    plan->scratch_desc = pd.scratchpad_desc();
  }
  if (plan->kernel_desc != hwio) {
    // Forward and input gradient read the kernel (HWIO -> blocked); the
    // weight gradient writes it (blocked -> HWIO).
    plan->kernel_reorder = std::make_unique<dnnl::reorder>(
        kind == 'w' ? dnnl::reorder::primitive_desc(
                          Engine(), plan->kernel_desc, Engine(), hwio)
                    : dnnl::reorder::primitive_desc(Engine(), hwio, Engine(),
                                                    plan->kernel_desc));
  }
  return plan;
}

const Plan& GetPlan(char kind, const ConvShape& s) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::unique_ptr<Plan>> plans;
  std::string key = s.Key(kind);
  std::lock_guard<std::mutex> lock(mutex);
  auto it = plans.find(key);
  if (it == plans.end()) it = plans.emplace(key, BuildPlan(kind, s)).first;
  return *it->second;
}

std::vector<char>& ThreadBuffer(int which, size_t bytes) {
  thread_local std::vector<char> buffers[2];
  if (buffers[which].size() < bytes) buffers[which].resize(bytes);
  return buffers[which];
}

// Runs one convolution. `map_a`, `map_b` are the NHWC arguments of the
// primitive (src, dst; diff_dst, diff_src; or src, diff_dst), `kernel` the HWIO
// buffer, read or written depending on `kind`.
ffi::Error Run(char kind, const ConvShape& s, void* map_a, void* map_b,
               void* kernel) {
  try {
    const Plan& plan = GetPlan(kind, s);
    dnnl::stream stream(Engine());
    memory hwio(s.Kernel(Tag::hwio), Engine(), kernel);
    memory blocked = hwio;
    if (plan.kernel_reorder) {
      auto& buffer = ThreadBuffer(0, plan.kernel_desc.get_size());
      blocked = memory(plan.kernel_desc, Engine(), buffer.data());
      if (kind != 'w') plan.kernel_reorder->execute(stream, hwio, blocked);
    }
    auto& scratch_buffer = ThreadBuffer(1, plan.scratch_desc.get_size());
    memory scratch(plan.scratch_desc, Engine(), scratch_buffer.data());
    std::unordered_map<int, memory> args{{DNNL_ARG_SCRATCHPAD, scratch}};
    if (kind == 'f') {
      args[DNNL_ARG_SRC] = memory(s.Input(Tag::nhwc), Engine(), map_a);
      args[DNNL_ARG_WEIGHTS] = blocked;
      args[DNNL_ARG_DST] = memory(s.Output(Tag::nhwc), Engine(), map_b);
    } else if (kind == 'd') {
      args[DNNL_ARG_DIFF_DST] = memory(s.Output(Tag::nhwc), Engine(), map_a);
      args[DNNL_ARG_WEIGHTS] = blocked;
      args[DNNL_ARG_DIFF_SRC] = memory(s.Input(Tag::nhwc), Engine(), map_b);
    } else {
      args[DNNL_ARG_SRC] = memory(s.Input(Tag::nhwc), Engine(), map_a);
      args[DNNL_ARG_DIFF_DST] = memory(s.Output(Tag::nhwc), Engine(), map_b);
      args[DNNL_ARG_DIFF_WEIGHTS] = blocked;
    }
    plan.conv.execute(stream, args);
    if (kind == 'w' && plan.kernel_reorder) {
      plan.kernel_reorder->execute(stream, blocked, hwio);
    }
    stream.wait();
  } catch (const dnnl::error& e) {
    return ffi::Error::Internal(std::string("oneDNN convolution: ") + e.what());
  }
  return ffi::Error::Success();
}

ConvShape Shape(ffi::Span<const int64_t> in, ffi::Span<const int64_t> kernel,
                ffi::Span<const int64_t> out, int64_t sh, int64_t sw,
                int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  return ConvShape{in[0],     in[1],  in[2],  in[3], kernel[0], kernel[1],
                   kernel[3], out[1], out[2], sh,    sw,        pt,
                   pb,        pl,     pr};
}

ffi::Error Forward(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                   ffi::ResultBuffer<ffi::F32> y, int64_t sh, int64_t sw,
                   int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  ConvShape s = Shape(x.dimensions(), w.dimensions(), y->dimensions(), sh, sw,
                      pt, pb, pl, pr);
  return Run('f', s, x.untyped_data(), y->untyped_data(), w.untyped_data());
}

ffi::Error BackwardData(ffi::Buffer<ffi::F32> dy, ffi::Buffer<ffi::F32> w,
                        ffi::ResultBuffer<ffi::F32> dx, int64_t sh, int64_t sw,
                        int64_t pt, int64_t pb, int64_t pl, int64_t pr) {
  ConvShape s = Shape(dx->dimensions(), w.dimensions(), dy.dimensions(), sh,
                      sw, pt, pb, pl, pr);
  return Run('d', s, dy.untyped_data(), dx->untyped_data(), w.untyped_data());
}

ffi::Error BackwardWeights(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                           ffi::ResultBuffer<ffi::F32> dw, int64_t sh,
                           int64_t sw, int64_t pt, int64_t pb, int64_t pl,
                           int64_t pr) {
  ConvShape s = Shape(x.dimensions(), dw->dimensions(), dy.dimensions(), sh,
                      sw, pt, pb, pl, pr);
  return Run('w', s, x.untyped_data(), dy.untyped_data(), dw->untyped_data());
}

// All three handlers: two float32 buffers in, one out, and the geometry.
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Arg<ffi::Buffer<ffi::F32>>()
      .Ret<ffi::Buffer<ffi::F32>>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_top")
      .Attr<int64_t>("pad_bottom")
      .Attr<int64_t>("pad_left")
      .Attr<int64_t>("pad_right");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmOnednnConvForward, Forward, ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmOnednnConvBackwardData, BackwardData,
                              ConvBinding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(LdmOnednnConvBackwardWeights, BackwardWeights,
                              ConvBinding());
