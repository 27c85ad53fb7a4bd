"""The case tables of check_emu.py: carried states, packed batches, decode steps and heads
above 128 (the arguments of its check_state, check_varlen, check_decode and check_case)."""
import torch

from emu_common import C

STATE_CASES = [
    # dtype, Hq, Hk, lens (N for B = 2, or segment lengths), prefill, Dk, Dv, center, normalize
    (torch.float64, 4, 2, 100, 70, 5, 3, True, True),
    (torch.float64, 2, 1, 1, 3, 4, 6, True, True),
    (torch.float64, 2, 2, 65, 9, 3, 4, False, True),
    (torch.float64, 2, 1, 40, 5, 6, 2, True, False),
    (torch.float64, 2, 1, 0, 5, 3, 2, True, True),
    (torch.float64, 4, 2, [0, 70, 1, 64, 5], 20, 5, 3, True, True),
    (torch.float64, 2, 1, [3, 0, 66], 4, 4, 4, False, False),
    (torch.float32, 3, 1, 130, 80, 16, 8, True, True),
    (torch.bfloat16, 2, 1, 70, 30, 8, 8, True, True),
    # prefill 0: an empty carried state (count 0), which picks its ref from the keys
    (torch.float64, 2, 1, [0, 70, 3], 0, 4, 3, True, True),
    (torch.float32, 2, 1, 70, 0, 5, 3, False, True),
]



STATE_OP_CASES = [
    # dtype, Hk, lens (N for B = 2, or segment lengths), prefill (None: no state), Dk, Dv
    (torch.float64, 2, [0, 70, 3], 9, 5, 3),
    (torch.float32, 1, 130, 0, 16, 8),
    (torch.float64, 2, 65, None, 4, 6),
    (torch.bfloat16, 1, [40, 90], 20, 8, 8),
]


VARLEN_CASES = [
    # dtype, Hq, Hk, lens, Dk, Dv, causal, center, normalize
    (torch.float64, 4, 2, [1, 0, 70, 64, 5, 130], 5, 3, True, True, True),
    (torch.float64, 2, 1, [33, 0, 0, 100, 1], 6, 4, False, True, True),
    (torch.float64, 2, 2, [3, 65, 9], 4, 3, True, False, False),
    (torch.float32, 3, 1, [70, 20, 64], 16, 8, True, True, True),
    (torch.float32, 2, 1, [129, 2], 9, 5, False, False, True),
    (torch.bfloat16, 2, 1, [40, 90], 8, 8, True, True, True),
]


DECODE_CASES = [
    # dtype, B, Hq, Hk, Dk, Dv, center, normalize, prefill, steps, kinds
    (torch.float64, 2, 4, 2, 5, 3, True, True, 9, 3, ("contiguous",) * 3),
    (torch.float64, 1, 6, 1, 16, 20, True, True, 70, 2, ("transposed", "padded", "every_other")),
    (torch.float64, 2, 2, 2, 7, 17, False, False, 5, 2, ("contiguous",) * 3),
    (torch.float64, 1, 2, 1, 3, 2, True, True, 0, 3, ("contiguous",) * 3),
    (torch.float32, 3, 8, 2, 12, 33, True, True, 40, 2, ("padded", "contiguous", "transposed")),
    (torch.float32, 1, 1, 1, 1, 1, True, False, 4, 2, ("contiguous",) * 3),
    (torch.float16, 2, 4, 2, 8, 8, True, True, 30, 2, ("contiguous",) * 3),
    (torch.bfloat16, 1, 5, 1, 16, 16, False, True, 30, 2, ("every_other", "contiguous", "padded")),
]


# Heads above 128, up to the limit of 256 (Gemma's heads): D = 256, odd sizes, Dk != Dv both
# ways, forward and backward, carried state, decode; float32 and bfloat16 (tensor cores) at
# least. Each case runs on an emulated device (DEVICES, or its opt-in bytes): its shared memory
# decides how many rows the state scans stage per step (32, 16 or 8; csq_state.cuh), noted as
# fwd/bwd rows. The first WIDE_QUICK cases run in quick mode (and so in CI: about 50 s), all of
# them in wide mode and in the full check.
WIDE_CASES = [
    # device, check, arguments (of check_case / check_state / check_decode)
    ("A100", "case", (torch.float32, 1, 1, 1, 70, 256, 256, True, True, True,
                      (C, "transposed", C))),  # rows 32 / 16
    ("H100", "case", (torch.bfloat16, 1, 1, 1, 65, 256, 64, True, True, True, (C, C, C))),
    ("sm86", "case", (torch.bfloat16, 1, 2, 1, 66, 64, 256, True, True, True,
                      ("transposed", C, "padded"))),  # rows 16 / 16
    ("sm86", "case", (torch.float64, 1, 1, 1, 66, 64, 256, True, True, True, (C, C, C))),  # 8 / 8
    (50688, "case", (torch.float32, 1, 1, 1, 65, 256, 32, True, True, True, (C, C, C))),  # 16 / 8
    ("H100", "case", (torch.float32, 1, 2, 1, 100, 200, 129, False, True, False,
                      ("padded", C, "every_other"))),
    ("H100", "state", (torch.float32, 2, 1, [5, 66], 20, 256, 64, True, True)),
    ("H100", "state", (torch.bfloat16, 2, 1, [5, 66], 20, 64, 256, True, True)),
    ("H100", "decode", (torch.float32, 1, 2, 1, 256, 256, True, True, 10, 2, (C, C, C))),
    ("H100", "decode", (torch.bfloat16, 1, 4, 2, 256, 64, True, True, 10, 2,
                        ("padded", C, "transposed"))),
    ("H100", "decode", (torch.bfloat16, 1, 2, 1, 64, 256, False, True, 0, 2, (C, C, C))),
    ("H100", "decode", (torch.float32, 2, 2, 2, 200, 129, True, False, 3, 2, (C, C, C))),
    # wide mode and the full check only
    ("H100", "case", (torch.bfloat16, 1, 2, 1, 65, 256, 256, True, True, True, (C, C, C))),
    # float64 at 256: rows 32 / 16 on an H100, 16 / 8 on an A100
    ("H100", "case", (torch.float64, 1, 1, 1, 67, 256, 256, False, True, True, (C, C, C))),
    ("A100", "case", (torch.float64, 1, 1, 1, 70, 256, 256, True, True, True, (C, C, C))),
    ("sm86", "case", (torch.float32, 1, 1, 1, 70, 256, 256, True, True, True, (C, C, C))),  # 8 / 8
    ("H100", "case", (torch.float16, 1, 1, 1, 70, 129, 200, True, False, True, (C, C, C))),
    ("A100", "case", (torch.bfloat16, 1, 1, 1, 130, 256, 256, True, True, True,
                      (C, C, C))),  # rows 32 / 16
    ("H100", "state", (torch.float32, 2, 1, [66], 10, 256, 256, True, True)),
    ("H100", "state", (torch.bfloat16, 2, 1, [5, 66], 20, 200, 48, True, True)),
    ("A100", "state", (torch.float64, 2, 1, [70], 20, 256, 256, True, True)),
    ("H100", "decode", (torch.float64, 1, 2, 1, 256, 256, True, True, 10, 2, (C, C, C))),
    ("H100", "decode", (torch.float16, 1, 2, 1, 129, 200, True, True, 0, 3, (C, C, C))),
]
WIDE_QUICK = 12
