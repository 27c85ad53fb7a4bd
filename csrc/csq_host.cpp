#include "csq_host.h"

#include <algorithm>


namespace csq {

at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& shift, double eps, int64_t tile_size) {
  TORCH_CHECK(q.dim() == 4, "csq_ext: q must have shape (B, Hq, N, Dk), got ", q.sizes());
  TORCH_CHECK(k.dim() == 4, "csq_ext: k must have shape (B, Hk, N, Dk), got ", k.sizes());
  TORCH_CHECK(v.dim() == 4, "csq_ext: v must have shape (B, Hk, N, Dv), got ", v.sizes());
  TORCH_CHECK(k.size(0) == q.size(0) && v.size(0) == q.size(0),
              "csq_ext: q, k, v must share the batch size B");
  TORCH_CHECK(k.size(2) == q.size(2) && v.size(2) == q.size(2),
              "csq_ext: q, k, v must share the length N");
  TORCH_CHECK(k.size(3) == q.size(3), "csq_ext: k must have Dk = q.size(-1) = ", q.size(3));
  TORCH_CHECK(q.size(3) > 0 && v.size(3) > 0, "csq_ext: head sizes Dk and Dv must be positive");
  TORCH_CHECK(v.size(1) == k.size(1), "csq_ext: v must have Hk = k.size(1) = ", k.size(1));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "csq_ext: Hq = ", q.size(1), " must be a multiple of Hk = ", k.size(1));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "csq_ext: q, k, v must share one dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "csq_ext: q, k, v must be floating point");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device() &&
                  q.device() == shift.device(),
              "csq_ext: q, k, v, shift must be on one device");
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == q.size(1),
              "csq_ext: shift must have shape (Hq,) = (", q.size(1), ",), got ", shift.sizes());
  TORCH_CHECK(at::isFloatingType(shift.scalar_type()), "csq_ext: shift must be floating point");
  TORCH_CHECK(eps >= 0, "csq_ext: eps must be >= 0, got ", eps);
  TORCH_CHECK(tile_size >= 0, "csq_ext: tile_size must be >= 0 (0 = default), got ",
              tile_size);
}

int64_t default_chunk(int64_t dim_k, bool on_cuda) {
  if (on_cuda) return 64;
  // The state GEMMs are (C x F) by (F x Dv); a longer chunk makes them more efficient while the
  // C x C block inside a chunk stays cheap next to them. Measured in bench/NOTES.md (5, 17):
  // 128 for small heads, and for heads above 128, whose state (F x (Dv + 1): 34 MB at
  // Dk = Dv = 256) a chunk reads and updates from memory, so that longer chunks cross it less
  // often (clamp_chunk caps it by the features: 126 at Dk = 256).
  return dim_k <= 32 || dim_k > 128 ? 128 : 64;
}

namespace {

// The chunk a knob asks for, as the CPU kernels run it (docs/SPEC.md, section 7): never
// longer than the sequence, than kMaxChunk, or than keeps a chunk's feature rows (C x F
// elements, a few buffers per thread) below kMaxChunkFeatureElems: a knob never allocates
// by its own value. And never shorter than kMinChunk (or the sequence): a chunk of one or
// two keys makes the next query read a state of as few keys, whose rounding nothing
// averages (dq 7e-5, dk 8e-5 from 1e-5 at Dk = 128, scale 1, chunk 1, N = 2).
constexpr int64_t kMinChunk = 16, kMaxChunk = 512, kMaxChunkFeatureElems = int64_t(1) << 22;

int64_t clamp_chunk(int64_t chunk, int64_t features, int64_t seqlen) {
  const int64_t by_features = std::max<int64_t>(64, kMaxChunkFeatureElems / features);
  chunk = std::min({chunk, kMaxChunk, by_features});
  chunk = std::max(chunk, kMinChunk);
  return std::max<int64_t>(1, std::min(chunk, seqlen));
}

}  // namespace

void fill_qkv_params(QkvParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& shift_acc, bool causal, double scale, bool center,
                     bool normalize, double eps) {
  p.batch = q.size(0);
  p.heads_q = q.size(1);
  p.heads_k = k.size(1);
  p.seqlen = q.size(2);
  p.dim_k = q.size(3);
  p.dim_v = v.size(3);
  p.num_seqs = p.batch;  // set_packed_sequences changes it for packed sequences
  p.group = p.heads_q / p.heads_k;
  for (int i = 0; i < 4; ++i) {
    p.q_stride[i] = q.stride(i);
    p.k_stride[i] = k.stride(i);
    p.v_stride[i] = v.stride(i);
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.shift = shift_acc.data_ptr();
  p.scale = scale;
  p.eps = eps;
  p.causal = causal;
  p.center = center;
  p.normalize = normalize;
}

at::Tensor set_packed_sequences(QkvParams& p, const at::Tensor& q,
                                const c10::optional<at::Tensor>& cu_seqlens) {
  p.num_seqs = p.batch;
  if (!cu_seqlens.has_value() || !cu_seqlens->defined()) return at::Tensor();
  const at::Tensor& c = *cu_seqlens;
  TORCH_CHECK(c.dim() == 1 && c.size(0) >= 2 &&
                  (c.scalar_type() == at::kInt || c.scalar_type() == at::kLong),
              "csq_ext: cu_seqlens must be an int32 or int64 tensor of shape (S + 1,)");
  TORCH_CHECK(p.batch == 1, "csq_ext: with cu_seqlens, q must have shape (1, Hq, T, Dk)");
  at::Tensor cu = c.to(at::kCPU, at::kLong).contiguous();
  const int64_t* cp = cu.data_ptr<int64_t>();
  const int64_t segs = cu.size(0) - 1;
  TORCH_CHECK(cp[0] == 0 && cp[segs] == p.seqlen,
              "csq_ext: cu_seqlens must start at 0 and end at T = ", p.seqlen);
  for (int64_t s = 0; s < segs; ++s)
    TORCH_CHECK(cp[s] <= cp[s + 1], "csq_ext: cu_seqlens must be non-decreasing");
  // The kernels index cu_seqlens on the device of q.
  cu = cu.to(q.device());
  p.cu_seqlens = cu.data_ptr<int64_t>();
  p.num_seqs = segs;
  return cu;
}

std::vector<int64_t> state_shape(const QkvParams& p, FeatureCount features) {
  return {p.num_seqs, p.heads_k, features(p.dim_k), p.dim_v + 1};
}

namespace {

bool given(const c10::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

}  // namespace

void set_carried_state(const QkvParams& p, CarriedState& cs, const at::Tensor& q,
                       const c10::optional<at::Tensor>& state_in,
                       const c10::optional<at::Tensor>& ref_in, FeatureCount features) {
  const bool has_state = given(state_in);
  const bool has_ref = given(ref_in) && ref_in->numel() != 0;
  const auto acc = acc_dtype(q.scalar_type());
  if (has_state) {
    TORCH_CHECK(p.causal, "csq_ext: a carried state needs causal=True");
    TORCH_CHECK(has_ref, "csq_ext: state_in needs its ref");
    const at::Tensor& s = *state_in;
    const std::vector<int64_t> shape = state_shape(p, features);
    TORCH_CHECK(s.sizes() == at::IntArrayRef(shape) && s.scalar_type() == acc &&
                    s.device() == q.device() && s.is_contiguous(),
                "csq_ext: state sums must be a contiguous ", acc, " tensor of shape (S, Hk, F, "
                "Dv + 1) = ", at::IntArrayRef(shape), " on ", q.device(), ", got ",
                s.scalar_type(), " ", s.sizes(), " on ", s.device());
    cs.state_in = s.data_ptr();
  }
  if (has_ref) {
    const at::Tensor& r = *ref_in;
    TORCH_CHECK(r.sizes() == at::IntArrayRef({p.num_seqs, p.heads_k, p.dim_k}) &&
                    r.scalar_type() == acc && r.device() == q.device() && r.is_contiguous(),
                "csq_ext: state ref must be a contiguous ", acc, " tensor of shape (S, Hk, Dk) "
                "= (", p.num_seqs, ", ", p.heads_k, ", ", p.dim_k, ")");
    cs.ref_in = r.data_ptr();
  }
}

StateOutputs alloc_state_outputs(const QkvParams& p, CarriedState& cs,
                                 const at::TensorOptions& opts, bool returns, bool with_ref,
                                 FeatureCount features) {
  StateOutputs o{returns ? at::empty(state_shape(p, features), opts) : at::empty({0}, opts),
                 with_ref ? at::empty({p.num_seqs, p.heads_k, p.dim_k}, opts)
                          : at::empty({0}, opts)};
  cs.state_out = returns ? o.state_out.data_ptr() : nullptr;
  cs.ref_out = with_ref ? o.ref_out.data_ptr() : nullptr;
  return o;
}

StateGradients set_state_gradients(const QkvParams& p, const CarriedState& cs,
                                   CarriedStateGrads& g, const at::TensorOptions& opts,
                                   const c10::optional<at::Tensor>& dstate_out,
                                   const c10::optional<at::Tensor>& dref_out, bool ref_given, bool with_ref,
                                   FeatureCount features) {
  StateGradients t;
  const std::vector<int64_t> shape = state_shape(p, features);
  const std::vector<int64_t> ref_shape = {p.num_seqs, p.heads_k, p.dim_k};
  // The incoming gradients, if given (and not empty): contiguous copies in the accumulation
  // dtype.
  if (given(dstate_out) && dstate_out->numel() != 0) {
    TORCH_CHECK(dstate_out->sizes() == at::IntArrayRef(shape),
                "csq_ext backward: dstate_out must have the state's shape ",
                at::IntArrayRef(shape), ", got ", dstate_out->sizes());
    t.dstate_out = dstate_out->to(opts.dtype()).contiguous();
    g.dstate_out = t.dstate_out.data_ptr();
  }
  g.ref_given = ref_given;
  if (given(dref_out) && dref_out->numel() != 0) {
    TORCH_CHECK(with_ref && dref_out->sizes() == at::IntArrayRef(ref_shape),
                "csq_ext backward: dref_out must have the ref's shape (S, Hk, Dk) = ",
                at::IntArrayRef(ref_shape), ", got ", dref_out->sizes());
    t.dref_out = dref_out->to(opts.dtype()).contiguous();
    g.dref_out = t.dref_out.data_ptr();
  }
  const bool carried = cs.state_in != nullptr;
  t.dstate_in = carried ? at::zeros(shape, opts) : at::empty({0}, opts);
  t.dref = with_ref ? at::zeros(ref_shape, opts) : at::empty({0}, opts);
  g.dstate_in = carried ? t.dstate_in.data_ptr() : nullptr;
  g.dref = with_ref ? t.dref.data_ptr() : nullptr;
  return t;
}

void fill_forward_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& shift,
                         const c10::optional<at::Tensor>& cu_seqlens,
                         const c10::optional<at::Tensor>& state_in,
                         const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                         bool center, bool normalize, double eps, int64_t tile_size,
                         FeatureCount features, at::Tensor& shift_acc, at::Tensor& cu) {
  // q, k, v are read through their strides; shift is tiny and converted here.
  shift_acc = shift.to(acc_dtype(q.scalar_type())).contiguous();
  fill_qkv_params(p, q, k, v, shift_acc, causal, scale, center, normalize, eps);
  p.chunk = clamp_chunk(tile_size > 0 ? tile_size : default_chunk(p.dim_k, q.is_cuda()),
                        features(p.dim_k), p.seqlen);
  cu = set_packed_sequences(p, q, cu_seqlens);
  set_carried_state(p, p, q, state_in, ref_in, features);
}

ForwardCall prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
                            const c10::optional<at::Tensor>& state_in,
                            const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                            bool center, bool normalize, double eps, int64_t tile_size,
                            bool return_state, FeatureCount features) {
  check_inputs(q, k, v, shift, eps, tile_size);
  TORCH_CHECK(causal || !return_state, "csq_ext: return_state needs causal=True");
  ForwardCall c;
  FwdParams& p = c.p;
  fill_forward_params(p, q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                      normalize, eps, tile_size, features, c.shift_acc, c.cu_seqlens);
  // y in the accumulation dtype: the public function rounds it, the backward reads it exact.
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  c.y = at::empty({p.batch, p.heads_q, p.seqlen, p.dim_v}, opts);
  c.b = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  c.den = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  const StateOutputs st = alloc_state_outputs(p, p, opts, return_state, true, features);
  c.state_out = st.state_out;
  c.ref_out = st.ref_out;
  p.y = c.y.data_ptr();
  p.b = c.b.data_ptr();
  p.den = c.den.data_ptr();
  return c;
}

namespace {

// Checks dy and the forward's saved y, b, den (set_backward_tensors); points `grad` at dy and
// `saved` at contiguous y, b, den, kept in c.
void set_saved_forward(BackwardTensors& c, ForwardOutputs& saved, GradientFields& grad,
                       const at::Tensor& q, const at::Tensor& v, const at::Tensor& dy,
                       const at::Tensor& y, const at::Tensor& b, const at::Tensor& den) {
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), Dv = v.size(3);
  const auto on_q = [&](const at::Tensor& t) { return t.device() == q.device(); };
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({B, Hq, N, Dv}) && dy.scalar_type() == acc &&
                  on_q(dy),
              "csq_ext backward: dy must have shape (B, Hq, N, Dv) = ",
              at::IntArrayRef({B, Hq, N, Dv}), ", the accumulation dtype ", acc,
              " of y and the device of q; got ", dy.sizes(), " ", dy.scalar_type());
  TORCH_CHECK(y.sizes() == dy.sizes() && y.scalar_type() == acc && on_q(y),
              "csq_ext backward: y must be the forward's output, (B, Hq, N, Dv) in ", acc);
  TORCH_CHECK(b.sizes() == at::IntArrayRef({B, Hq, N}) && den.sizes() == b.sizes() &&
                  b.scalar_type() == acc && den.scalar_type() == acc && on_q(b) && on_q(den),
              "csq_ext backward: b and den must be the forward's auxiliary outputs, (B, Hq, N) "
              "in ", acc);
  // The forward's own outputs are contiguous (free); direct op calls with views stay correct.
  c.y = y.contiguous();
  c.b = b.contiguous();
  c.den = den.contiguous();
  for (int i = 0; i < 4; ++i) grad.dy_stride[i] = dy.stride(i);
  grad.dy = dy.data_ptr();
  saved.y = c.y.data_ptr();
  saved.b = c.b.data_ptr();
  saved.den = c.den.data_ptr();
}

// The zeroed accumulators dq, dk, dv, db (accumulation dtype), kept in c; points `grad` at them.
void alloc_gradients(BackwardTensors& c, GradientFields& grad, const at::Tensor& q,
                     const at::Tensor& k, const at::Tensor& v) {
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  c.dq = at::zeros(q.sizes(), opts);
  c.dk = at::zeros(k.sizes(), opts);
  c.dv = at::zeros(v.sizes(), opts);
  c.db = at::zeros({q.size(0), q.size(1), q.size(2)}, opts);
  grad.dq = c.dq.data_ptr();
  grad.dk = c.dk.data_ptr();
  grad.dv = c.dv.data_ptr();
  grad.db = c.db.data_ptr();
}

}  // namespace

void set_backward_tensors(BackwardTensors& c, const QkvParams& p, const CarriedState& cs,
                          ForwardOutputs& saved, GradientFields& grad, CarriedStateGrads& g,
                          const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                          const at::Tensor& v, const at::Tensor& shift, const at::Tensor& y,
                          const at::Tensor& b, const at::Tensor& den,
                          const c10::optional<at::Tensor>& dstate_out,
                          const c10::optional<at::Tensor>& dref_out, bool ref_given,
                          bool with_ref, FeatureCount features) {
  c.input_dtype = q.scalar_type();
  c.shift_dtype = shift.scalar_type();
  set_saved_forward(c, saved, grad, q, v, dy, y, b, den);
  alloc_gradients(c, grad, q, k, v);
  c.state = set_state_gradients(p, cs, g, q.options().dtype(acc_dtype(q.scalar_type())),
                                dstate_out, dref_out, ref_given, with_ref, features);
}

BackwardResult BackwardTensors::outputs() const {
  // The shift of head h is in every b_i of that head, in every batch entry and sequence.
  return {dq.to(input_dtype),
          dk.to(input_dtype),
          dv.to(input_dtype),
          db.sum(at::IntArrayRef{0, 2}).to(shift_dtype),
          state.dstate_in,
          state.dref};
}

BackwardCall prepare_backward(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& cu_seqlens,
                              const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
                              const at::Tensor& y, const at::Tensor& b, const at::Tensor& den,
                              const c10::optional<at::Tensor>& dstate_out,
                              const c10::optional<at::Tensor>& dref_out, bool ref_given, bool causal,
                              double scale, bool center, bool normalize, double eps,
                              int64_t tile_size, FeatureCount features) {
  check_inputs(q, k, v, shift, eps, tile_size);
  BackwardCall c;
  BwdParams& p = c.p;
  // ref is the forward's: the kernels read it instead of picking r again.
  c.ref = ref.contiguous();
  fill_forward_params(p, q, k, v, shift, cu_seqlens, state_in, c.ref, causal, scale, center,
                      normalize, eps, tile_size, features, c.shift_acc, c.cu_seqlens);
  set_backward_tensors(c, p, p, p, p, p, dy, q, k, v, shift, y, b, den, dstate_out, dref_out,
                       ref_given, /*with_ref=*/true, features);
  return c;
}

double state_condition_limit(at::ScalarType input) {
  if (input == at::kDouble) return 0;
  return input == at::kFloat ? kStateConditionLimitFloat : kStateConditionLimitHalf;
}

namespace {

c10::optional<at::Tensor> in_float64(const c10::optional<at::Tensor>& t) {
  if (!t.has_value() || !t->defined()) return t;
  return t->to(at::kDouble);
}

at::Tensor like(const at::Tensor& t, at::ScalarType dtype) { return t.to(dtype); }

}  // namespace

ForwardResult forward_in_float64(ForwardOp op, const at::Tensor& q, const at::Tensor& k,
                                 const at::Tensor& v, const at::Tensor& shift,
                                 const c10::optional<at::Tensor>& cu_seqlens,
                                 const c10::optional<at::Tensor>& state_in,
                                 const c10::optional<at::Tensor>& ref_in, bool causal,
                                 double scale, bool center, bool normalize, double eps,
                                 int64_t tile_size, bool return_state) {
  const auto acc = acc_dtype(q.scalar_type());
  const auto out = op(q.to(at::kDouble), k.to(at::kDouble), v.to(at::kDouble),
                      shift.to(at::kDouble), cu_seqlens, in_float64(state_in),
                      in_float64(ref_in), causal, scale, center, normalize, eps, tile_size,
                      return_state);
  return {like(std::get<0>(out), acc), like(std::get<1>(out), acc), like(std::get<2>(out), acc),
          like(std::get<3>(out), acc), like(std::get<4>(out), acc)};
}

BackwardResult backward_in_float64(BackwardOp op, const at::Tensor& dy, const at::Tensor& q,
                                   const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& shift,
                                   const c10::optional<at::Tensor>& cu_seqlens,
                                   const c10::optional<at::Tensor>& state_in,
                                   const at::Tensor& ref, const at::Tensor& y,
                                   const at::Tensor& b, const at::Tensor& den,
                                   const c10::optional<at::Tensor>& dstate_out,
                                   const c10::optional<at::Tensor>& dref_out, bool ref_given,
                                   bool causal, double scale, bool center, bool normalize,
                                   double eps, int64_t tile_size) {
  const auto acc = acc_dtype(q.scalar_type());
  const auto d = at::kDouble;
  const auto out = op(dy.to(d), q.to(d), k.to(d), v.to(d), shift.to(d), cu_seqlens,
                      in_float64(state_in), ref.to(d), y.to(d), b.to(d), den.to(d),
                      in_float64(dstate_out), in_float64(dref_out), ref_given, causal, scale,
                      center, normalize, eps, tile_size);
  return {like(std::get<0>(out), q.scalar_type()), like(std::get<1>(out), q.scalar_type()),
          like(std::get<2>(out), q.scalar_type()), like(std::get<3>(out), shift.scalar_type()),
          like(std::get<4>(out), acc), like(std::get<5>(out), acc)};
}

DecodeParams prepare_decode_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& shift, const at::Tensor& y, double scale,
                                 bool center, bool normalize, double eps) {
  check_inputs(q, k, v, shift, eps, 0);
  TORCH_CHECK(q.size(2) == 1, "csq_ext.decode: q, k, v must hold one token (N = 1), got N = ",
              q.size(2));
  const auto acc = acc_dtype(q.scalar_type());
  TORCH_CHECK(shift.scalar_type() == acc && shift.is_contiguous(),
              "csq_ext.decode_: shift must be a contiguous ", acc, " tensor");
  DecodeParams p;
  fill_qkv_params(p, q, k, v, shift, true, scale, center, normalize, eps);
  TORCH_CHECK(y.sizes() == at::IntArrayRef({p.batch, p.heads_q, 1, p.dim_v}) &&
                  y.scalar_type() == q.scalar_type() && y.is_contiguous() &&
                  y.device() == q.device(),
              "csq_ext.decode_: out must be a contiguous (B, Hq, 1, Dv) tensor of q's dtype on ",
              q.device());
  p.y = y.data_ptr();
  return p;
}

DecodeParams prepare_decode(const at::Tensor& sums, const at::Tensor& ref, const at::Tensor& q,
                            const at::Tensor& k, const at::Tensor& v, const at::Tensor& shift,
                            const at::Tensor& y, double scale, bool center, bool normalize,
                            double eps, FeatureCount features) {
  DecodeParams p = prepare_decode_step(q, k, v, shift, y, scale, center, normalize, eps);
  CarriedState carried;  // the same checks of sums and ref as a carried state's
  set_carried_state(p, carried, q, sums, ref, features);
  p.sums = sums.data_ptr();
  p.ref = ref.data_ptr();  // written when the state holds no key yet
  return p;
}

}  // namespace csq
