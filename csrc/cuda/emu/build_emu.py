"""Builds libcsqemu.so: the CUDA launchers and kernels of csrc/cuda compiled as plain C++ against
the emulator in this folder. Usage: python build_emu.py [OUTDIR] (default /tmp/csqemu)."""
import os
import re
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_DIR = os.path.dirname(HERE)
CSRC = os.path.dirname(CUDA_DIR)
OUT = sys.argv[1] if len(sys.argv) > 1 else "/tmp/csqemu"

LAUNCH = re.compile(r"([\w:]+(?:<[^<>;]*>)?)<<<(.*?)>>>\((.*?)\);", re.S)
SMEM = "extern __shared__ __align__(16) unsigned char smem_raw[];"


def transform(text):
    text = text.replace(SMEM, "unsigned char* smem_raw = emu::dyn_smem().data();")
    return LAUNCH.sub(r"emu::launch(\1, \2, \3);", text)


def main():
    src = os.path.join(OUT, "src")
    shutil.rmtree(src, ignore_errors=True)
    os.makedirs(os.path.join(src, "cuda"))
    # the torch-free headers the kernels include, and the tests' feature maps
    for name in ("csq_params.h", "csq_feature_map.h", "csq_feature_maps.h",
                 "csq_direct_params.h", os.path.join("testing", "csq_linear_map.h")):
        os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
        shutil.copy(os.path.join(CSRC, name), os.path.join(src, name))
    for name in os.listdir(CUDA_DIR):
        if name.endswith((".cu", ".cuh", ".h")):
            with open(os.path.join(CUDA_DIR, name)) as f:
                text = transform(f.read())
            with open(os.path.join(src, "cuda", name), "w") as f:
                f.write(text)
    units = [os.path.join(src, "cuda", n) for n in ("csq_chunked_fwd_launch.cu",
                                                    "csq_chunked_bwd_launch.cu",
                                                    "csq_decode_launch.cu",
                                                    "csq_direct_launch.cu",
                                                    "csq_state_launch.cu")]
    units += [os.path.join(HERE, "emu_harness.cc"), os.path.join(HERE, "emu_direct_harness.cc")]
    lib = os.path.join(OUT, "libcsqemu.so")
    cmd = ["g++", "-std=c++17", "-O1", "-g", "-fPIC", "-shared", "-Wall", "-Wno-unused", "-Wno-unknown-pragmas",
           "-DCSQ_CUDA_EMULATOR", "-DCSQ_TEST_FEATURE_MAPS",
           "-I", os.path.join(HERE, "include"), "-I", os.path.join(src, "cuda"),
           "-x", "c++"] + units + ["-o", lib]
    print(" ".join(cmd))
    subprocess.run(cmd, check=True)
    print(lib)


if __name__ == "__main__":
    main()
