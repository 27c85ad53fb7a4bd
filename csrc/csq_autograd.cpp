// The differentiable operators' autograd, in C++ (TORCH_LIBRARY_IMPL(csq_ext, Autograd)):
// the forward ops save what their backward op reads and hand it the incoming gradients; the
// backward ops refuse a second derivative. One kernel for every backend (the Autograd alias key
// covers CPU and CUDA). Written in C++ rather than with torch.library.register_autograd because
// the Python wrapper cost ~65 us a call, twice the whole operator at N = 16 (bench_overhead.py).
//
// The formulas are the operators': which ref a sequence's sums are relative to, and where a
// picked ref's gradient goes, is decided by the backward op (csrc/csq_params.h); here gradients
// are only passed along.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

using AttentionFwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const OptTensor&, bool, double, bool, bool, double, int64_t, bool);
using AttentionBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const OptTensor&,
    const OptTensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const OptTensor&, const OptTensor&, bool, bool, double, bool, bool, double, int64_t);
using StateSig = std::tuple<Tensor, Tensor>(const Tensor&, const Tensor&, const OptTensor&,
                                            const OptTensor&, const OptTensor&, int64_t);
using StateBwdSig = std::tuple<Tensor, Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const OptTensor&, const OptTensor&, const Tensor&,
    const OptTensor&, const OptTensor&, bool, int64_t);

// A typed handle of a registered operator. Every call through one sits under an
// at::AutoDispatchBelowADInplaceOrView guard, so that it reaches the backend kernel and not this
// file's kernels again (Function::apply only turns grad mode off).
template <typename Sig>
c10::TypedOperatorHandle<Sig> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

bool requires_grad(const Tensor& t) { return t.defined() && t.requires_grad(); }
bool requires_grad(const OptTensor& t) { return t.has_value() && requires_grad(*t); }
template <typename T>
bool requires_grad(const T&) {
  return false;
}

// Whether a call records a graph node. One that does not (no grad mode, or no input that
// requires grad: inference, torch.no_grad, the backward's own calls, torch.func.vmap, which
// refuses C++ autograd functions) calls the operator directly.
template <typename... T>
bool records_graph(const T&... args) {
  return at::GradMode::is_enabled() && (requires_grad(args) || ...);
}

OptTensor optional_of(const Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }
Tensor tensor_of(const OptTensor& t) { return t.has_value() ? *t : Tensor(); }

constexpr char kChunked[] = "chunked";
constexpr char kDirect[] = "direct";

// csq_{chunked,direct}_fwd: the two algorithms take the same arguments and return the same
// outputs, so one formula serves both. Outputs y, b, den, state_out, ref; b and den are for
// the backward only (never returned by the public function): not differentiable.
template <const char* Path>
struct AttentionFunction : torch::autograd::Function<AttentionFunction<Path>> {
  static c10::TypedOperatorHandle<AttentionFwdSig> fwd_op() {
    static const auto op = op_handle<AttentionFwdSig>(
        Path == kChunked ? "csq_ext::csq_chunked_fwd" : "csq_ext::csq_direct_fwd");
    return op;
  }
  static c10::TypedOperatorHandle<AttentionBwdSig> bwd_op() {
    static const auto op = op_handle<AttentionBwdSig>(
        Path == kChunked ? "csq_ext::csq_chunked_bwd" : "csq_ext::csq_direct_bwd");
    return op;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& q, const Tensor& k,
                               const Tensor& v, const Tensor& shift, const OptTensor& cu_seqlens,
                               const OptTensor& state_in, const OptTensor& ref_in, bool causal,
                               double scale, bool center, bool normalize, double eps,
                               int64_t tile_size, bool return_state) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, b, den, state_out, ref] =
        fwd_op().call(q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                      normalize, eps, tile_size, return_state);
    // Outputs the loss does not use arrive undefined, not as zeros: the returned state and
    // ref are unused by most callers, and only a used one may pass the ref's gradient on to
    // the keys it was picked from, where a NaN after them would otherwise reach them too.
    ctx->set_materialize_grads(false);
    ctx->mark_non_differentiable({b, den});
    ctx->save_for_backward({q, k, v, shift, tensor_of(cu_seqlens), tensor_of(state_in), ref, y,
                            b, den});
    ctx->saved_data["has_ref_in"] = ref_in.has_value();
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["center"] = center;
    ctx->saved_data["normalize"] = normalize;
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["tile_size"] = tile_size;
    return {y, b, den, state_out, ref};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const variable_list s = ctx->get_saved_variables();
    const Tensor &q = s[0], &k = s[1], &v = s[2], &shift = s[3], &y = s[7];
    const OptTensor state_in = optional_of(s[5]);
    const bool has_ref_in = ctx->saved_data["has_ref_in"].toBool();
    const Tensor dy = grads[0].defined() ? grads[0] : at::zeros_like(y);
    // dref_in: the gradient of ref_in where the op kept it (0 where it picked its own ref
    // from the keys: dk holds that part).
    auto [dq, dk, dv, dshift, dstate_in, dref_in] = bwd_op().call(
        dy, q, k, v, shift, optional_of(s[4]), state_in, s[6], y, s[8], s[9],
        optional_of(grads[3]), optional_of(grads[4]), has_ref_in,
        ctx->saved_data["causal"].toBool(), ctx->saved_data["scale"].toDouble(),
        ctx->saved_data["center"].toBool(), ctx->saved_data["normalize"].toBool(),
        ctx->saved_data["eps"].toDouble(), ctx->saved_data["tile_size"].toInt());
    return {dq, dk, dv, dshift, Tensor(), state_in ? dstate_in : Tensor(),
            has_ref_in ? dref_in : Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
            Tensor(), Tensor()};
  }
};

// csq_state: the state after k and v alone, continuing state_in / ref_in.
struct StateFunction : torch::autograd::Function<StateFunction> {
  static c10::TypedOperatorHandle<StateSig> op() {
    static const auto handle = op_handle<StateSig>("csq_ext::csq_state");
    return handle;
  }

  static variable_list forward(AutogradContext* ctx, const Tensor& k, const Tensor& v,
                               const OptTensor& cu_seqlens, const OptTensor& state_in,
                               const OptTensor& ref_in, int64_t tile_size) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [sums, ref] = op().call(k, v, cu_seqlens, state_in, ref_in, tile_size);
    ctx->save_for_backward({k, v, tensor_of(cu_seqlens), tensor_of(state_in), ref});
    ctx->saved_data["has_ref_in"] = ref_in.has_value();
    ctx->saved_data["tile_size"] = tile_size;
    return {sums, ref};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static const auto op = op_handle<StateBwdSig>("csq_ext::csq_state_bwd");
    const variable_list s = ctx->get_saved_variables();
    const OptTensor state_in = optional_of(s[3]);
    const bool has_ref_in = ctx->saved_data["has_ref_in"].toBool();
    auto [dk, dv, dstate_in, dref_in] =
        op.call(s[0], s[1], optional_of(s[2]), state_in, s[4], optional_of(grads[0]),
                optional_of(grads[1]), has_ref_in, ctx->saved_data["tile_size"].toInt());
    return {dk, dv, Tensor(), state_in ? dstate_in : Tensor(),
            has_ref_in ? dref_in : Tensor(), Tensor()};
  }
};

// The backward ops run as themselves; a graph built through them (create_graph=True) can be
// built, but differentiating it again raises: the double backward is not implemented.
template <typename Sig>
struct NoDoubleBackward : torch::autograd::Function<NoDoubleBackward<Sig>> {
  template <typename... Args>
  static variable_list forward(AutogradContext*, const c10::TypedOperatorHandle<Sig>* op,
                               const Args&... args) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return std::apply([](const auto&... outs) { return variable_list{outs...}; },
                      op->call(args...));
  }
  static variable_list backward(AutogradContext*, variable_list) {
    TORCH_CHECK(false,
                "csq_ext.attention does not support double backward (gradients of gradients). "
                "Use the reference implementation csq_ext.reference.csq_attention_reference "
                "for higher-order derivatives.");
  }
};

template <typename R, size_t... I>
R tuple_of(const variable_list& outs, std::index_sequence<I...>) {
  return R{outs[I]...};
}

// The Autograd kernel of backward op Name, of signature Sig = R(Args...) (R: a tuple of
// tensors).
template <const char* Name, typename Sig>
struct BackwardKernel;
template <const char* Name, typename R, typename... Args>
struct BackwardKernel<Name, R(Args...)> {
  static R call(Args... args) {
    static const auto op = op_handle<R(Args...)>(Name);
    if (!records_graph(args...)) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      return op.call(args...);
    }
    const variable_list outs = NoDoubleBackward<R(Args...)>::apply(&op, args...);
    return tuple_of<R>(outs, std::make_index_sequence<std::tuple_size_v<R>>{});
  }
};

// The Autograd kernel of csq_{chunked,direct}_fwd.
template <const char* Path>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> attention_fwd(
    const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& shift,
    const OptTensor& cu_seqlens, const OptTensor& state_in, const OptTensor& ref_in, bool causal,
    double scale, bool center, bool normalize, double eps, int64_t tile_size,
    bool return_state) {
  if (!records_graph(q, k, v, shift, state_in, ref_in)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return AttentionFunction<Path>::fwd_op().call(q, k, v, shift, cu_seqlens, state_in, ref_in,
                                                  causal, scale, center, normalize, eps,
                                                  tile_size, return_state);
  }
  const variable_list o = AttentionFunction<Path>::apply(
      q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center, normalize, eps,
      tile_size, return_state);
  return {o[0], o[1], o[2], o[3], o[4]};
}

std::tuple<Tensor, Tensor> state(const Tensor& k, const Tensor& v, const OptTensor& cu_seqlens,
                                 const OptTensor& state_in, const OptTensor& ref_in,
                                 int64_t tile_size) {
  if (!records_graph(k, v, state_in, ref_in)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return StateFunction::op().call(k, v, cu_seqlens, state_in, ref_in, tile_size);
  }
  const variable_list o = StateFunction::apply(k, v, cu_seqlens, state_in, ref_in, tile_size);
  return {o[0], o[1]};
}

constexpr char kChunkedBwd[] = "csq_ext::csq_chunked_bwd";
constexpr char kDirectBwd[] = "csq_ext::csq_direct_bwd";
constexpr char kStateBwd[] = "csq_ext::csq_state_bwd";

}  // namespace

TORCH_LIBRARY_IMPL(csq_ext, Autograd, m) {
  m.impl("csq_chunked_fwd", &attention_fwd<kChunked>);
  m.impl("csq_direct_fwd", &attention_fwd<kDirect>);
  m.impl("csq_state", &state);
  m.impl("csq_chunked_bwd", &BackwardKernel<kChunkedBwd, AttentionBwdSig>::call);
  m.impl("csq_direct_bwd", &BackwardKernel<kDirectBwd, AttentionBwdSig>::call);
  m.impl("csq_state_bwd", &BackwardKernel<kStateBwd, StateBwdSig>::call);
}
