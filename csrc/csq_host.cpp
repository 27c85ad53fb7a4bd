#include "csq_host.h"

#include <algorithm>

#include "csq_direct_params.h"

namespace csq {

at::ScalarType acc_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const at::Tensor& shift, double eps, int64_t chunk_size) {
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
  TORCH_CHECK(chunk_size >= 0, "csq_ext: chunk_size must be >= 0 (0 = default)");
}

namespace {

// Chunk length used when the caller passes chunk_size <= 0.
int64_t default_chunk(int64_t dim_k, bool on_cuda) {
  if (on_cuda) return 64;
  // The state GEMMs are (C x F) by (F x Dv); a longer chunk makes them more efficient while the
  // C x C block inside a chunk stays cheap next to them. Measured in bench/NOTES.md.
  return dim_k <= 32 ? 128 : 64;
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

std::vector<int64_t> state_shape(const QkvParams& p) {
  return {p.num_seqs, p.heads_k, num_features(p.dim_k), p.dim_v + 1};
}

namespace {

// The carried state (causal only): checks its sums and ref (shape, dtype, device) and points
// p at them. ref alone (the backward's, the forward's ref_out) is checked the same way.
void set_carried_state(FwdParams& p, const at::Tensor& q,
                       const c10::optional<at::Tensor>& state_in,
                       const c10::optional<at::Tensor>& ref_in) {
  const bool has_state = state_in.has_value() && state_in->defined();
  const bool has_ref = ref_in.has_value() && ref_in->defined();
  const auto acc = acc_dtype(q.scalar_type());
  if (has_state) {
    TORCH_CHECK(p.causal, "csq_ext: a carried state needs causal=True");
    TORCH_CHECK(has_ref, "csq_ext: state_in needs its ref");
    const at::Tensor& s = *state_in;
    TORCH_CHECK(s.sizes() == at::IntArrayRef(state_shape(p)) && s.scalar_type() == acc &&
                    s.device() == q.device() && s.is_contiguous(),
                "csq_ext: state sums must be a contiguous ", acc, " tensor of shape (S, Hk, F, "
                "Dv + 1) = ", at::IntArrayRef(state_shape(p)), " on ", q.device(), ", got ",
                s.scalar_type(), " ", s.sizes(), " on ", s.device());
    p.state_in = s.data_ptr();
  }
  if (has_ref) {
    const at::Tensor& r = *ref_in;
    TORCH_CHECK(r.sizes() == at::IntArrayRef({p.num_seqs, p.heads_k, p.dim_k}) &&
                    r.scalar_type() == acc && r.device() == q.device() && r.is_contiguous(),
                "csq_ext: state ref must be a contiguous ", acc, " tensor of shape (S, Hk, Dk) "
                "= (", p.num_seqs, ", ", p.heads_k, ", ", p.dim_k, ")");
    p.ref_in = r.data_ptr();
  }
}

}  // namespace

void fill_forward_params(FwdParams& p, const at::Tensor& q, const at::Tensor& k,
                         const at::Tensor& v, const at::Tensor& shift,
                         const c10::optional<at::Tensor>& cu_seqlens,
                         const c10::optional<at::Tensor>& state_in,
                         const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                         bool center, bool normalize, double eps, int64_t chunk_size,
                         at::Tensor& shift_acc, at::Tensor& cu) {
  // q, k, v are read through their strides; shift is tiny and converted here.
  shift_acc = shift.to(acc_dtype(q.scalar_type())).contiguous();
  fill_qkv_params(p, q, k, v, shift_acc, causal, scale, center, normalize, eps);
  p.chunk = chunk_size > 0 ? chunk_size : default_chunk(p.dim_k, q.is_cuda());
  // A chunk longer than the sequence only wastes workspace.
  p.chunk = std::max<int64_t>(1, std::min(p.chunk, p.seqlen));
  cu = set_packed_sequences(p, q, cu_seqlens);
  set_carried_state(p, q, state_in, ref_in);
}

ForwardCall prepare_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& shift, const c10::optional<at::Tensor>& cu_seqlens,
                            const c10::optional<at::Tensor>& state_in,
                            const c10::optional<at::Tensor>& ref_in, bool causal, double scale,
                            bool center, bool normalize, double eps, int64_t chunk_size,
                            bool return_state) {
  check_inputs(q, k, v, shift, eps, chunk_size);
  TORCH_CHECK(causal || !return_state, "csq_ext: return_state needs causal=True");
  ForwardCall c;
  FwdParams& p = c.p;
  fill_forward_params(p, q, k, v, shift, cu_seqlens, state_in, ref_in, causal, scale, center,
                      normalize, eps, chunk_size, c.shift_acc, c.cu_seqlens);
  // y in the accumulation dtype: the public function rounds it, the backward reads it exact.
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  c.y = at::empty({p.batch, p.heads_q, p.seqlen, p.dim_v}, opts);
  c.b = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  c.den = at::empty({p.batch, p.heads_q, p.seqlen}, opts);
  c.state_out = return_state ? at::empty(state_shape(p), opts) : at::empty({0}, opts);
  c.ref_out = at::empty({p.num_seqs, p.heads_k, p.dim_k}, opts);
  p.y = c.y.data_ptr();
  p.b = c.b.data_ptr();
  p.den = c.den.data_ptr();
  p.state_out = return_state ? c.state_out.data_ptr() : nullptr;
  p.ref_out = c.ref_out.data_ptr();
  return c;
}

template <typename Params>
SavedForward set_saved_forward(Params& p, const at::Tensor& q, const at::Tensor& v,
                               const at::Tensor& dy, const at::Tensor& y, const at::Tensor& b,
                               const at::Tensor& den) {
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), Hq = q.size(1), N = q.size(2), Dv = v.size(3);
  const auto on_q = [&](const at::Tensor& t) { return t.device() == q.device(); };
  TORCH_CHECK(dy.sizes() == at::IntArrayRef({B, Hq, N, Dv}) && dy.scalar_type() == acc &&
                  on_q(dy),
              "csq_bwd: dy must have shape (B, Hq, N, Dv) = ", at::IntArrayRef({B, Hq, N, Dv}),
              ", the accumulation dtype ", acc, " of y and the device of q; got ", dy.sizes(),
              " ", dy.scalar_type());
  TORCH_CHECK(y.sizes() == dy.sizes() && y.scalar_type() == acc && on_q(y),
              "csq_bwd: y must be the forward's output, (B, Hq, N, Dv) in ", acc);
  TORCH_CHECK(b.sizes() == at::IntArrayRef({B, Hq, N}) && den.sizes() == b.sizes() &&
                  b.scalar_type() == acc && den.scalar_type() == acc && on_q(b) && on_q(den),
              "csq_bwd: b and den must be the forward's auxiliary outputs, (B, Hq, N) in ", acc);
  // The forward's own outputs are contiguous (free); direct op calls with views stay correct.
  SavedForward s{y.contiguous(), b.contiguous(), den.contiguous()};
  for (int i = 0; i < 4; ++i) p.dy_stride[i] = dy.stride(i);
  p.dy = dy.data_ptr();
  p.y = s.y.data_ptr();
  p.b = s.b.data_ptr();
  p.den = s.den.data_ptr();
  return s;
}

template <typename Params>
GradientTensors alloc_gradients(Params& p, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v) {
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  GradientTensors g{at::zeros(q.sizes(), opts), at::zeros(k.sizes(), opts),
                    at::zeros(v.sizes(), opts), at::zeros({p.batch, p.heads_q, p.seqlen}, opts)};
  p.dq = g.dq.data_ptr();
  p.dk = g.dk.data_ptr();
  p.dv = g.dv.data_ptr();
  p.db = g.db.data_ptr();
  return g;
}

template SavedForward set_saved_forward<BwdParams>(BwdParams&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&, const at::Tensor&,
                                                   const at::Tensor&);
template SavedForward set_saved_forward<DirectBwdParams>(DirectBwdParams&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&, const at::Tensor&,
                                                         const at::Tensor&);
template GradientTensors alloc_gradients<BwdParams>(BwdParams&, const at::Tensor&,
                                                    const at::Tensor&, const at::Tensor&);
template GradientTensors alloc_gradients<DirectBwdParams>(DirectBwdParams&, const at::Tensor&,
                                                          const at::Tensor&, const at::Tensor&);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gradient_outputs(
    const at::Tensor& dq, const at::Tensor& dk, const at::Tensor& dv, const at::Tensor& db,
    at::ScalarType input_dtype, at::ScalarType shift_dtype) {
  // The shift of head h is in every b_i of that head, in every batch entry and sequence.
  return {dq.to(input_dtype), dk.to(input_dtype), dv.to(input_dtype),
          db.sum(at::IntArrayRef{0, 2}).to(shift_dtype)};
}

BackwardCall prepare_backward(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& shift,
                              const c10::optional<at::Tensor>& cu_seqlens,
                              const c10::optional<at::Tensor>& state_in, const at::Tensor& ref,
                              const at::Tensor& y, const at::Tensor& b, const at::Tensor& den,
                              const c10::optional<at::Tensor>& dstate_out, bool causal,
                              double scale, bool center, bool normalize, double eps,
                              int64_t chunk_size) {
  check_inputs(q, k, v, shift, eps, chunk_size);
  BackwardCall c;
  BwdParams& p = c.p;
  c.input_dtype = q.scalar_type();
  c.shift_dtype = shift.scalar_type();
  // ref is the forward's: the kernels read it instead of picking r again.
  c.ref = ref.contiguous();
  fill_forward_params(p, q, k, v, shift, cu_seqlens, state_in, c.ref, causal, scale, center,
                      normalize, eps, chunk_size, c.shift_acc, c.cu_seqlens);
  const auto acc = acc_dtype(q.scalar_type());
  const SavedForward saved = set_saved_forward(p, q, v, dy, y, b, den);
  c.y = saved.y;
  c.b = saved.b;
  c.den = saved.den;
  // The gradient of the returned state, if given (and not empty): a contiguous copy in the
  // accumulation dtype.
  if (dstate_out.has_value() && dstate_out->defined() && dstate_out->numel() != 0) {
    TORCH_CHECK(dstate_out->sizes() == at::IntArrayRef(state_shape(p)),
                "csq_bwd: dstate_out must have the state's shape ",
                at::IntArrayRef(state_shape(p)), ", got ", dstate_out->sizes());
    c.dstate_out = dstate_out->to(acc).contiguous();
    p.dstate_out = c.dstate_out.data_ptr();
  }
  const GradientTensors g = alloc_gradients(p, q, k, v);
  c.dq = g.dq;
  c.dk = g.dk;
  c.dv = g.dv;
  c.db = g.db;
  const auto opts = q.options().dtype(acc);
  const bool carried = p.state_in != nullptr;
  c.dstate_in = carried ? at::zeros(state_shape(p), opts) : at::empty({0}, opts);
  c.dref = at::zeros({p.num_seqs, p.heads_k, p.dim_k}, opts);
  p.dstate_in = carried ? c.dstate_in.data_ptr() : nullptr;
  p.dref = c.dref.data_ptr();
  return c;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
BackwardCall::outputs() const {
  const auto g = gradient_outputs(dq, dk, dv, db, input_dtype, shift_dtype);
  return {std::get<0>(g), std::get<1>(g), std::get<2>(g), std::get<3>(g), dstate_in, dref};
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
                            double eps) {
  DecodeParams p = prepare_decode_step(q, k, v, shift, y, scale, center, normalize, eps);
  FwdParams carried;  // the same checks of sums and ref as a carried state's
  static_cast<QkvParams&>(carried) = p;
  set_carried_state(carried, q, sums, ref);
  p.sums = sums.data_ptr();
  p.ref = ref.data_ptr();  // written when the state holds no key yet
  return p;
}

}  // namespace csq
