"""Builds csq_ext._C against the installed torch: the CPU kernels always, the CUDA kernels when
torch has CUDA and nvcc is found (or CSQ_FORCE_CUDA=1). See the README's build table.

The module uses only the limited Python API (an empty PyInit__C; the operators register through
the dispatcher), so one `_C.abi3.so` imports under every Python >= 3.10 with the same torch (torch's Py_LIMITED_API)."""
import glob
import os

import setuptools
from setuptools import setup

# pyproject.toml's `license = "MIT"` / `license-files` (PEP 639) need setuptools 77; an older one
# (Python 3.11's venv ships 65) fails with a long schema error. A build without isolation uses
# whatever setuptools the environment has, so say what to do.
if int(setuptools.__version__.split(".")[0]) < 77:
    raise SystemExit(f"csq_ext needs setuptools>=77 to build (found {setuptools.__version__}): "
                     "pip install 'setuptools>=77' wheel ninja")
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0a"


def env_flag(name: str, default: str = "0") -> bool:
    return os.environ.get(name, default).lower() in ("1", "true", "yes", "on")


def debug_and_link_flags() -> tuple[list[str], list[str]]:
    """Release by default: no debug info (Python's own CFLAGS carry -g, which made the module
    ~20 MB) and a stripped module. CSQ_DEBUG=1 keeps debug info and symbols (an optimized
    build with -g, for gdb / perf); CSQ_STRIP=0 keeps the symbol table of a release build."""
    if env_flag("CSQ_DEBUG"):
        return ["-g"], []
    return ["-g0"], (["-s"] if env_flag("CSQ_STRIP", "1") else [])


def want_cuda() -> bool:
    if env_flag("CSQ_FORCE_CPU"):
        return False
    if env_flag("CSQ_FORCE_CUDA"):
        return True  # a build machine with nvcc but no GPU
    import torch
    return torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None


def rel(pattern: str):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def make_extension():
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    debug, strip = debug_and_link_flags()
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + debug
    ldflags = ["-fopenmp"] + strip
    if not want_cuda():
        return cpp_extension.CppExtension("csq_ext._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=ldflags, py_limited_api=True)
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_CUDA_ARCHS
    os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by cpp_extension for -gencode flags
    defines = ["-DCSQ_WITH_CUDA", f'-DCSQ_BUILD_CUDA_ARCHS="{archs}"']
    nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    if env_flag("CSQ_PTXAS_VERBOSE"):  # ptxas's register / spill report of the flags that ship
        nvcc.append("-Xptxas=-v")
    sources += rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    return cpp_extension.CUDAExtension(
        "csq_ext._C", sources,
        extra_compile_args={"cxx": cxx + defines, "nvcc": nvcc + defines},
        extra_link_args=ldflags, py_limited_api=True)


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, with its object files kept in build/temp also for editable
    installs (which would compile everything afresh in a temporary folder each time): ninja
    then recompiles only what changed, for `pip install -e` and `pip wheel` alike. An explicit
    `setup.py build_ext -t DIR` still picks its own folder."""

    def finalize_options(self):
        if self.build_temp is None:
            self.build_temp = os.path.join(ROOT, "build", "temp")
        super().finalize_options()


setup(
    ext_modules=[make_extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
)
