"""The one home of argument checks for the public functions (attention, decode, decode_,
CSQState.empty): every check names the argument and says what it expects. A value out of
range or of the wrong shape raises ValueError (the spec's error for bad input); a wrong kind
of value raises ArgumentTypeError, both a TypeError (Python's convention) and a ValueError.

Messages are callables, formatted only on failure: formatting sizes when a check passes would
make torch.compile specialize on them (a recompile for every length)."""
from __future__ import annotations

import math
import numbers
import warnings

import torch
import torch.autograd.forward_ad as _fwAD

from .state import CSQState, num_features

_SYM = (torch.SymInt, torch.SymFloat)


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong kind (not a tensor, not a number, not a bool, ...)."""


def check(cond: bool, message) -> None:
    if not cond:
        raise ValueError(message())


def check_type(cond: bool, message) -> None:
    if not cond:
        raise ArgumentTypeError(message())


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _finite(x: float) -> bool:
    # Plain comparisons, not math.isfinite: torch.compile traces these as constants.
    return x == x and abs(x) != math.inf


def _kind(x) -> str:
    return type(x).__name__


def flag(name: str, x) -> bool:
    """causal, center, normalize, return_state: a bool, nothing that merely converts to one."""
    check_type(isinstance(x, bool), lambda: f"{name} must be a bool, got {_kind(x)}")
    return x


def _number(name: str, x, what: str) -> float:
    """A real Python or numpy number, or a one-element real tensor that does not require grad
    (the options are not differentiable: a tensor that requires grad would be detached)."""
    if type(x) is float:  # the common case first: isinstance against numbers.Real is slow
        return x
    if isinstance(x, torch.Tensor):
        check_type(x.numel() == 1 and not x.is_complex() and x.dtype != torch.bool,
                   lambda: f"{name} must be {what}, got a tensor of shape {tuple(x.shape)} and "
                   f"dtype {x.dtype}")
        check(not x.requires_grad, lambda: f"{name} is not differentiable: pass a float, not a "
              "tensor that requires grad (it would be silently detached)")
        check(x.device.type != "meta", lambda: f"{name} must hold a value, got a meta tensor")
        return float(x)
    if isinstance(x, _SYM):
        return x
    check_type(isinstance(x, numbers.Real) and not isinstance(x, bool),
               lambda: f"{name} must be {what}, got {_kind(x)}")
    return float(x)


def scale(x, dim_k: int) -> float:
    """tau: None (1 / sqrt(Dk)) or a finite real number."""
    if x is None:
        return float(dim_k ** -0.5)
    tau = _number("scale", x, "a finite float or None")
    check(isinstance(tau, _SYM) or _finite(tau),
          lambda: f"scale must be a finite float or None, got {tau}")
    return tau


def eps(x) -> float:
    value = _number("eps", x, "a finite float >= 0")
    check(isinstance(value, _SYM) or (_finite(value) and value >= 0),
          lambda: f"eps must be a finite float >= 0, got {value}")
    return value


# Larger tuning sizes act as this one: the kernels clamp every tile and chunk to the sequence
# and to their own limits (docs/SPEC.md, section 7), so no knob allocates by its own value.
_TUNING_MAX = 1 << 30


def tuning_size(name: str, x) -> int:
    """A tuning knob's length (tile_size: the kernels' tile or chunk): None (0 to the op: the
    default) or a positive int, a Python or numpy integer but not a bool. The result does not
    depend on it; a value beyond the sequence or a kernel's limit acts as that limit."""
    if x is None:
        return 0
    if isinstance(x, torch.SymInt):
        return x
    check_type(isinstance(x, numbers.Integral) and not isinstance(x, bool),
               lambda: f"{name} must be a positive int or None, got {_kind(x)} {x!r}")
    value = int(x)
    check(value >= 1, lambda: f"{name} must be a positive int or None, got {value}")
    return min(value, _TUNING_MAX)


def tile_size(tile, chunk_size=None, stacklevel: int = 3) -> int:
    """The block length of the kernels (the chunk of the chunked path, the tile of the direct
    one): ``tile_size``, or its deprecated alias ``chunk_size`` (a DeprecationWarning; each is
    named by its own name in errors; passing both raises). 0 means the default."""
    if chunk_size is None:
        return tuning_size("tile_size", tile)
    check(tile is None, lambda: "pass tile_size or its deprecated alias chunk_size, not both "
          f"(got tile_size={tile!r}, chunk_size={chunk_size!r})")
    if not torch.compiler.is_compiling():
        warnings.warn("csq_ext: chunk_size is deprecated, pass tile_size (the same block "
                      "length)", DeprecationWarning, stacklevel=stacklevel)
    return tuning_size("chunk_size", chunk_size)


def no_forward_ad(**tensors) -> None:
    """Forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is not implemented:
    refuse dual tensors rather than return a zero tangent."""
    if _fwAD._current_level < 0 or torch.compiler.is_compiling():
        return  # no dual level entered: no tensor can carry a tangent (unpack_dual's own test)
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and _fwAD.unpack_dual(t).tangent is not None:
            raise NotImplementedError(
                f"csq_ext: forward-mode AD (torch.func.jvp / jacfwd / forward_ad) is not "
                f"implemented ({name} has a tangent); use reverse mode through torch.autograd "
                f"(.backward(), torch.autograd.grad) or csq_ext.reference.csq_attention_reference")


def no_functorch_grad() -> None:
    """torch.func's reverse-mode transforms (grad, vjp, jacrev, hessian) cannot run the
    operators' autograd (a C++ torch::autograd::Function, which they do not support): refuse
    with a message that says what works, instead of PyTorch's generic setup_context error.
    torch.func.vmap alone works (the operators run once per batch element)."""
    if not torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    if any(i.key() == TransformType.Grad for i in retrieve_all_functorch_interpreters()):
        raise NotImplementedError(
            "csq_ext: torch.func.grad / vjp / jacrev / hessian cannot differentiate "
            "csq_ext.attention (its operators' gradients are a C++ autograd function, "
            "which torch.func's transforms do not run); use torch.autograd.grad or "
            ".backward() (torch.func.vmap without grad works), or "
            "csq_ext.reference.csq_attention_reference inside torch.func")


def qkv(q, k, v) -> None:
    """q, k, v of shapes (B, Hq, N, Dk), (B, Hk, N, Dk), (B, Hk, N, Dv) with Hq % Hk == 0, one
    floating dtype, one device. Valid inputs pass one combined test (a call at small N costs
    microseconds); anything else gets the checks below, which name what is wrong."""
    if (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor)
            and isinstance(v, torch.Tensor) and q.dim() == 4 and k.dim() == 4 and v.dim() == 4
            and q.is_floating_point() and q.dtype == k.dtype == v.dtype
            and q.device == k.device == v.device):
        B, Hq, N, Dk = q.shape
        kB, Hk, kN, kD = k.shape
        vB, vH, vN, Dv = v.shape
        if (kB == B and vB == B and kN == N and vN == N and kD == Dk and vH == Hk and Hk > 0
                and Hq % Hk == 0 and Dk > 0 and Dv > 0):
            return
    _qkv_explained(q, k, v)


def _qkv_explained(q, k, v) -> None:
    for name, t, shape in (("q", q, "(B, Hq, N, Dk)"), ("k", k, "(B, Hk, N, Dk)"),
                           ("v", v, "(B, Hk, N, Dv)")):
        check_type(isinstance(t, torch.Tensor),
                   lambda: f"{name} must be a torch.Tensor of shape {shape}, got {_kind(t)}")
        check(t.dim() == 4, lambda: f"{name} must have shape {shape}, got {tuple(t.shape)}")
        check(t.is_floating_point(),
              lambda: f"{name} must be floating point (float64, float32, bfloat16, float16), "
              f"got {t.dtype}")
    B, Hq, N, Dk = q.shape
    Hk = k.shape[1]
    check(k.shape[0] == B and v.shape[0] == B,
          lambda: f"k and v must have batch size B = {B} like q; got k {tuple(k.shape)}, "
          f"v {tuple(v.shape)}")
    check(k.shape[2] == N and v.shape[2] == N,
          lambda: f"k and v must have length N = {N} like q; got k {tuple(k.shape)}, "
          f"v {tuple(v.shape)}")
    check(k.shape[3] == Dk, lambda: f"k must have shape (B, Hk, N, Dk) with Dk = {Dk} like q, "
          f"got {tuple(k.shape)}")
    check(v.shape[1] == Hk, lambda: f"v must have shape (B, Hk, N, Dv) with Hk = {Hk} like k, "
          f"got {tuple(v.shape)}")
    check(Hk > 0 and Hq % Hk == 0,
          lambda: f"the number of query heads Hq = {Hq} must be a multiple of the number of "
          f"key/value heads Hk = {Hk}")
    check(Dk > 0 and v.shape[3] > 0, lambda: "head sizes Dk and Dv must be positive")
    check(q.dtype == k.dtype == v.dtype,
          lambda: f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    check(q.device == k.device == v.device,
          lambda: f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def shift(x, q) -> torch.Tensor:
    """c: a real number, or a floating tensor of shape (Hq,) on q's device. Returns a tensor."""
    Hq = q.shape[1]

    def what():
        return f"a float or a floating-point torch.Tensor of shape (Hq,) = ({Hq},)"
    if isinstance(x, torch.Tensor):
        check(x.shape == (Hq,), lambda: f"shift must be {what()}, got shape {tuple(x.shape)}")
        check(x.is_floating_point(), lambda: f"shift must be {what()}, got dtype {x.dtype}")
        check(x.device == q.device,
              lambda: f"shift must be on the device of q ({q.device}), got {x.device}")
        return x
    c = _number("shift", x, "a float or a floating-point torch.Tensor of shape (Hq,)")
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or type(q) not in (torch.Tensor, torch.nn.Parameter)):
        # Traced, fake or subclass tensors: a fresh tensor of their kind.
        return torch.full((Hq,), c, dtype=acc_dtype(q.dtype), device=q.device)
    return _shift_tensor(c, Hq, acc_dtype(q.dtype), q.device)


_SHIFT_TENSORS: dict = {}


def _shift_tensor(c: float, heads: int, dtype: torch.dtype, device: torch.device):
    """The (Hq,) tensor of a float shift, made once per value, size, dtype and device: the ops
    only read it (it takes no gradient), and a fresh torch.full costs a call at small N a
    tenth of its time. Made outside inference mode (an inference tensor could not be saved
    for a later backward); bounded: cleared when it holds many."""
    key = (c, heads, dtype, device)
    t = _SHIFT_TENSORS.get(key)
    if t is None:
        if len(_SHIFT_TENSORS) >= 256:
            _SHIFT_TENSORS.clear()
        with torch.inference_mode(False):
            t = torch.full((heads,), c, dtype=dtype, device=device)
        _SHIFT_TENSORS[key] = t
    return t


def cu_seqlens(x, q) -> int:
    """Packed sequences: returns S, the number of sequences (the batch size without them)."""
    return packed_sequences(x, q)[0]


def packed_sequences(x, q):
    """Packed sequences: (S, offsets). S is the number of sequences (the batch size without
    them); the offsets are x's copy on the CPU, read once here for the data-dependent check and
    handed to the op, which then reads no device memory for them (x itself when traced)."""
    if x is None:
        return q.shape[0], None
    what = "an int32 or int64 tensor of shape (S + 1,): the offsets of S packed sequences"
    check_type(isinstance(x, torch.Tensor), lambda: f"cu_seqlens must be {what}, got {_kind(x)}")
    check(x.dim() == 1 and x.shape[0] >= 2 and x.dtype in (torch.int32, torch.int64),
          lambda: f"cu_seqlens must be {what}, got shape {tuple(x.shape)} and dtype {x.dtype}")
    check(x.device == q.device or (x.device.type == "cpu" and q.device.type != "meta"),
          lambda: f"cu_seqlens must be on the device of q ({q.device}) or the CPU, got {x.device}")
    check(q.shape[0] == 1,
          lambda: f"with cu_seqlens, q, k, v must pack the sequences along N with batch size 1: "
          f"q of shape (1, Hq, T, Dk), got {tuple(q.shape)}")
    if x.device.type == "meta" or torch.compiler.is_compiling():
        return x.shape[0] - 1, x
    c = x.cpu()  # a data-dependent check; the op checks it too
    check(int(c[0]) == 0 and int(c[-1]) == q.shape[2] and bool((c[1:] >= c[:-1]).all()),
          lambda: f"cu_seqlens must be non-decreasing offsets from 0 to T = {q.shape[2]}")
    return x.shape[0] - 1, c


def state(st, q, k, v, S: int, name: str, wide: bool = False) -> None:
    """A carried CSQState for S sequences of these q, k, v: sums and ref in the accumulation
    dtype, or with ``wide`` in float64 whatever the inputs (wide_state)."""
    check_type(isinstance(st, CSQState),
               lambda: f"{name} must be a csq_ext.CSQState (sums, ref); start a sequence with "
               f"csq_ext.CSQState.empty(...) or a prefill's state; got {_kind(st)}")
    Hk, Dk, Dv = k.shape[1], k.shape[3], v.shape[3]
    acc = acc_dtype(q.dtype)
    shapes = {"sums": ("(S, Hk, F, Dv + 1)", (S, Hk, num_features(Dk), Dv + 1)),
              "ref": ("(S, Hk, Dk)", (S, Hk, Dk))}
    for part, (text, want) in shapes.items():
        t = getattr(st, part)
        check_type(isinstance(t, torch.Tensor),
                   lambda: f"{name}.{part} must be a torch.Tensor of shape {text} = {want}, "
                   f"got {_kind(t)}")
        check(tuple(t.shape) == want,
              lambda: f"{name}.{part} must have shape {text} = {want}, got {tuple(t.shape)}")
        check(t.dtype == acc or (wide and t.dtype == torch.float64 == st.sums.dtype
                                 == st.ref.dtype),
              lambda: f"{name}.{part} must be {acc} for {q.dtype} inputs"
              + (" (or float64, sums and ref alike)" if wide and acc != torch.float64 else "")
              + f", got {t.dtype}")
        check(t.device == q.device,
              lambda: f"{name}.{part} must be on the device of q ({q.device}), got {t.device}")


def wide_state(st, q) -> bool:
    """A float64 state for float32 or half inputs: the call computes in float64, so that the
    state keeps float64 sums (docs/SPEC.md, section 3: keys spread far beyond their norm)."""
    return st is not None and st.sums.dtype == torch.float64 and q.dtype != torch.float64


def one_token(name: str, q, k, v) -> None:
    for arg, t, shape in (("q", q, "(B, Hq, 1, Dk)"), ("k", k, "(B, Hk, 1, Dk)"),
                          ("v", v, "(B, Hk, 1, Dv)")):
        check(t.shape[2] == 1, lambda: f"{name} takes one token per sequence: {arg} of shape "
              f"{shape}, got {tuple(t.shape)}")


def out(x, q, v):
    """decode_'s output buffer: None or a contiguous (B, Hq, 1, Dv) tensor like q."""
    want = (q.shape[0], q.shape[1], 1, v.shape[3])
    what = f"a contiguous {q.dtype} tensor of shape (B, Hq, 1, Dv) = {want} on {q.device}"
    if x is None:
        return q.new_empty(want)
    check_type(isinstance(x, torch.Tensor), lambda: f"out must be {what}, got {_kind(x)}")
    check(tuple(x.shape) == want and x.dtype == q.dtype and x.is_contiguous()
          and x.device == q.device,
          lambda: f"out must be {what}, got a {'' if x.is_contiguous() else 'non-'}contiguous "
          f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}")
    return x


def size(name: str, x, minimum: int) -> int:
    check_type(isinstance(x, numbers.Integral) and not isinstance(x, bool),
               lambda: f"{name} must be an int >= {minimum}, got {_kind(x)}")
    check(x >= minimum, lambda: f"{name} must be an int >= {minimum}, got {x}")
    return int(x)
