#include "csq_pool_host.h"

#include <vector>

namespace csq {
namespace {

// Checks the pool tensors against the call's sizes and records their slot strides in pool.
// Returns the number of slots P.
int64_t set_pool_tensors(StatePool& pool, const QkvParams& p, const at::Tensor& q,
                         const at::Tensor& sums, const at::Tensor& ref) {
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t F = StateMap::num_features(p.dim_k), V1 = p.dim_v + 1;
  TORCH_CHECK(sums.dim() == 4 && sums.size(1) == p.heads_k && sums.size(2) == F &&
                  sums.size(3) == V1 && sums.scalar_type() == acc && sums.device() == q.device(),
              "csq_ext pool: sums must be a ", acc, " tensor of shape (P, Hk, F, Dv + 1) = (P, ",
              p.heads_k, ", ", F, ", ", V1, ") on ", q.device(), ", got ", sums.scalar_type(),
              " ", sums.sizes(), " on ", sums.device());
  const int64_t P = sums.size(0);
  TORCH_CHECK(ref.dim() == 3 && ref.size(0) == P && ref.size(1) == p.heads_k &&
                  ref.size(2) == p.dim_k && ref.scalar_type() == acc &&
                  ref.device() == q.device(),
              "csq_ext pool: ref must be a ", acc, " tensor of shape (P, Hk, Dk) = (", P, ", ",
              p.heads_k, ", ", p.dim_k, ") on ", q.device(), ", got ", ref.scalar_type(), " ",
              ref.sizes(), " on ", ref.device());
  const int64_t head = F * V1, slot_sums = p.heads_k * head, slot_ref = p.heads_k * p.dim_k;
  // A slot's block is contiguous; slots may lie any distance apart, but never overlap.
  TORCH_CHECK(sums.stride(3) == 1 && sums.stride(2) == V1 && sums.stride(1) == head &&
                  (P <= 1 || sums.stride(0) >= slot_sums),
              "csq_ext pool: each slot of sums must be one contiguous (Hk, F, Dv + 1) block and "
              "slots must not overlap (strides (>= ", slot_sums, ", ", head, ", ", V1,
              ", 1)), got strides ", sums.strides());
  TORCH_CHECK(ref.stride(2) == 1 && ref.stride(1) == p.dim_k &&
                  (P <= 1 || ref.stride(0) >= slot_ref),
              "csq_ext pool: each slot of ref must be one contiguous (Hk, Dk) block and slots "
              "must not overlap (strides (>= ", slot_ref, ", ", p.dim_k, ", 1)), got strides ",
              ref.strides());
  pool.sums_stride = P <= 1 ? slot_sums : sums.stride(0);
  pool.ref_stride = P <= 1 ? slot_ref : ref.stride(0);
  // sums and ref must not share an element (a write to one would change the other). Both
  // are slot-strided byte ranges; when they lie in one buffer with one slot stride (vLLM's
  // pages), slot i of one meets slot j of the other only for the few j - i checked below.
  if (P == 0) return P;
  const int64_t es = int64_t(sums.element_size());
  const int64_t s0 = int64_t(reinterpret_cast<uintptr_t>(sums.data_ptr()));
  const int64_t r0 = int64_t(reinterpret_cast<uintptr_t>(ref.data_ptr()));
  const int64_t sb = slot_sums * es, rb = slot_ref * es;
  const int64_t ss = pool.sums_stride * es, rs = pool.ref_stride * es;
  const bool spans_meet = s0 < r0 + (P - 1) * rs + rb && r0 < s0 + (P - 1) * ss + sb;
  bool overlap = spans_meet;
  if (spans_meet && ss == rs) {
    overlap = false;  // ref slot j starts at delta + (j - i) ss from sums slot i
    const int64_t delta = r0 - s0;
    for (int64_t m = -(P - 1); m <= P - 1 && !overlap; ++m) {
      const int64_t start = delta + m * ss;
      overlap = start < sb && start + rb > 0;
    }
  }
  TORCH_CHECK(!overlap, "csq_ext pool: sums and ref must not share memory");
  return P;
}

// The slot of each of the S sequences, checked (in [0, P), distinct), as int64 on `device`.
at::Tensor slot_indices(StatePool& pool, const at::Tensor& slots, int64_t S, int64_t P,
                        const at::Device& device) {
  TORCH_CHECK(slots.dim() == 1 && slots.size(0) == S &&
                  (slots.scalar_type() == at::kInt || slots.scalar_type() == at::kLong),
              "csq_ext pool: slots must be an int32 or int64 tensor of shape (S,) = (", S,
              ",), one slot per sequence; got ", slots.scalar_type(), " ", slots.sizes());
  const at::Tensor host = slots.to(at::kCPU, at::kLong).contiguous();
  const int64_t* idx = host.data_ptr<int64_t>();
  std::vector<unsigned char> used(size_t(P), 0);
  for (int64_t s = 0; s < S; ++s) {
    TORCH_CHECK(idx[s] >= 0 && idx[s] < P, "csq_ext pool: slots[", s, "] = ", idx[s],
                " is not a slot of the pool (0 <= slot < P = ", P, ")");
    TORCH_CHECK(!used[size_t(idx[s])], "csq_ext pool: slot ", idx[s],
                " is named twice in slots: every sequence needs a slot of its own");
    used[size_t(idx[s])] = 1;
  }
  at::Tensor dev = host.to(device);
  pool.slots = dev.data_ptr<int64_t>();
  return dev;
}

// The fresh-state flags (optional has_initial_state: False = start empty), uint8 on `device`.
at::Tensor fresh_flags(StatePool& pool, const c10::optional<at::Tensor>& has_initial_state,
                       int64_t S, const at::Device& device) {
  if (!has_initial_state.has_value() || !has_initial_state->defined()) return at::Tensor();
  const at::Tensor& h = *has_initial_state;
  TORCH_CHECK(h.dim() == 1 && h.size(0) == S && h.scalar_type() == at::kBool,
              "csq_ext pool: has_initial_state must be a bool tensor of shape (S,) = (", S,
              ",); got ", h.scalar_type(), " ", h.sizes());
  at::Tensor fresh = h.logical_not().to(device, at::kByte).contiguous();
  pool.fresh = fresh.data_ptr<uint8_t>();
  return fresh;
}

}  // namespace

PoolPrefillCall prepare_pool_prefill(const at::Tensor& sums, const at::Tensor& ref,
                                     const at::Tensor& slots,
                                     const c10::optional<at::Tensor>& has_initial_state,
                                     const at::Tensor& q, const at::Tensor& k,
                                     const at::Tensor& v, const at::Tensor& shift,
                                     const at::Tensor& cu_seqlens, double scale, bool center,
                                     bool normalize, double eps, int64_t tile_size) {
  check_inputs(q, k, v, shift, eps, tile_size);
  PoolPrefillCall c;
  FwdParams& p = c.p;
  fill_forward_params(p, q, k, v, shift, cu_seqlens, c10::nullopt, c10::nullopt, true, scale,
                      center, normalize, eps, tile_size, &StateMap::num_features, c.shift_acc,
                      c.cu_seqlens);
  TORCH_CHECK(p.cu_seqlens != nullptr,
              "csq_ext pool prefill: cu_seqlens is required (S + 1 offsets of the packed "
              "sequences)");
  const int64_t P = set_pool_tensors(p.pool, p, q, sums, ref);
  c.slots = slot_indices(p.pool, slots, p.num_seqs, P, q.device());
  c.fresh = fresh_flags(p.pool, has_initial_state, p.num_seqs, q.device());
  // In place: every sequence reads its slot's state and writes its own back.
  p.state_in = p.state_out = sums.data_ptr();
  p.ref_in = p.ref_out = ref.data_ptr();
  const auto opts = q.options().dtype(acc_dtype(q.scalar_type()));
  c.y = at::empty({1, p.heads_q, p.seqlen, p.dim_v}, opts);
  c.b = at::empty({1, p.heads_q, p.seqlen}, opts);
  c.den = at::empty({1, p.heads_q, p.seqlen}, opts);
  p.y = c.y.data_ptr();
  p.b = c.b.data_ptr();
  p.den = c.den.data_ptr();
  c.empty = p.seqlen == 0;
  return c;
}

void PoolPrefillCall::run_empty(const at::Tensor& sums, const at::Tensor& ref) const {
  if (!fresh.defined()) return;
  const at::Tensor idx = slots.masked_select(fresh.to(at::kBool));
  sums.index_fill_(0, idx, 0);  // count 0: an empty state (its ref is picked when keys come)
  ref.index_fill_(0, idx, 0);
}

PoolDecodeCall prepare_pool_decode(const at::Tensor& sums, const at::Tensor& ref,
                                   const at::Tensor& slots,
                                   const c10::optional<at::Tensor>& has_initial_state,
                                   const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& shift, const at::Tensor& y, double scale,
                                   bool center, bool normalize, double eps) {
  PoolDecodeCall c;
  c.p = prepare_decode_step(q, k, v, shift, y, scale, center, normalize, eps);
  DecodeParams& p = c.p;
  const int64_t P = set_pool_tensors(p.pool, p, q, sums, ref);
  c.slots = slot_indices(p.pool, slots, p.batch, P, q.device());
  c.fresh = fresh_flags(p.pool, has_initial_state, p.batch, q.device());
  p.sums = sums.data_ptr();
  p.ref = ref.data_ptr();
  return c;
}

}  // namespace csq
