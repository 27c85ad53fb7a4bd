"""Stand-in shared libraries that let a CUDA build of torch import on a machine without its
GPU runtime libraries (cuDNN, cuBLAS, NCCL, ...), so that CI can build, link and load the CUDA
extension without downloading gigabytes of libraries that only a GPU would use.

    python .ci/cuda_stand_ins.py OUTDIR        (then LD_LIBRARY_PATH=OUTDIR:...)

For each library that torch's own libraries need and that cannot be found (ldconfig, the CUDA
toolkit's lib64, torch/lib), it writes a library with that soname which defines every symbol
torch imports from it, with the symbol versions torch asks for, each as a function that returns
at once. Nothing here ever runs a kernel: importing torch, loading our extension and listing
its registered kernels is all that happens with them. Needs readelf, nm and gcc.
"""
import glob
import os
import re
import subprocess
import sys

import importlib.util

TORCH_LIB = os.path.join(os.path.dirname(importlib.util.find_spec("torch").origin), "lib")
CUDA_HOME = os.environ.get("CUDA_HOME", "/usr/local/cuda")
SEARCH = [TORCH_LIB, os.path.join(CUDA_HOME, "lib64")]


def run(*cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def needed(lib):
    return re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", run("readelf", "-d", "-W", lib))


def locate(name):
    """The path the dynamic loader would take for a soname, or None."""
    for d in SEARCH:
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    m = re.search(rf"^\s+{re.escape(name)} \(.*?\) => (\S+)$", run("ldconfig", "-p"), re.M)
    return m.group(1) if m else None


def version_needs(lib):
    """{version name: file} from the library's .gnu.version_r."""
    out, current, result = run("readelf", "-V", "-W", lib), None, {}
    for line in out.splitlines():
        m = re.search(r"File: (\S+)", line)
        if m:
            current = m.group(1)
        m = re.search(r"Name: (\S+)\s+Flags", line)
        if m and current:
            result[m.group(1)] = current
    return result


def undefined(lib):
    """[(symbol, version or None)] that the library imports."""
    out = run("readelf", "--dyn-syms", "-W", lib)
    syms = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 8 and parts[6] == "UND" and parts[7]:
            name, _, version = parts[7].partition("@")
            syms.append((name, version.split()[0] if version else None))
    return syms


def defined(lib):
    out = run("nm", "-D", "--defined-only", lib)
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


def main(outdir):
    os.makedirs(outdir, exist_ok=True)
    libs = sorted(glob.glob(os.path.join(TORCH_LIB, "*.so*")) +
                  glob.glob(os.path.join(os.path.dirname(TORCH_LIB), "_C*.so")))
    missing = sorted({n for lib in libs for n in needed(lib) if not locate(n)})
    # What the libraries that are present define; what is left over comes from the missing ones.
    present = set()
    for lib in libs:
        present |= defined(lib)
    for name in {n for lib in libs for n in needed(lib)} - set(missing):
        present |= defined(locate(name))
    versioned = {m: {} for m in missing}   # stand-in -> {version: {symbols}}
    unversioned = set()
    for lib in libs:
        owners = version_needs(lib)
        for sym, version in undefined(lib):
            owner = owners.get(version) if version else None
            if owner in versioned:
                versioned[owner].setdefault(version, set()).add(sym)
            elif version is None and sym not in present:
                unversioned.add(sym)
    for name in missing:
        stem = os.path.join(outdir, name)
        syms = {(s, v) for v, ss in versioned[name].items() for s in ss}
        # Unversioned leftovers go into every stand-in: any one of them in scope resolves them.
        syms |= {(s, None) for s in unversioned}
        with open(stem + ".s", "w") as f:
            for i, (sym, _) in enumerate(sorted(syms)):
                f.write(f".globl stub_{i}\n.type stub_{i},@function\nstub_{i}:\n  ret\n")
            for i, (sym, version) in enumerate(sorted(syms)):
                f.write(f'.symver stub_{i}, {sym}@@{version or "STAND_IN"}\n')
        versions = sorted({v for _, v in syms if v} | {"STAND_IN"})
        with open(stem + ".map", "w") as f:
            for v in versions:
                f.write(f"{v} {{ }};\n")
        subprocess.run(["gcc", "-shared", "-nostdlib", "-o", stem, f"-Wl,-soname,{name}",
                        f"-Wl,--version-script={stem}.map", stem + ".s"], check=True)
        os.remove(stem + ".s")
        os.remove(stem + ".map")
        print(f"stand-in {name}: {len(syms)} symbols")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "cuda-stand-ins")
