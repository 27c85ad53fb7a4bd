"""Summarizes ptxas's verbose output (nvcc -Xptxas=-v) from a build log: one line per kernel
and architecture with registers, spill bytes and stack, spills first.

    python .ci/ptxas_report.py build.log
"""
import re
import shutil
import subprocess
import sys


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return names
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
    return out.stdout.splitlines()


def main(path):
    rows, current = [], None
    for line in open(path, errors="replace"):
        m = re.search(r"Compiling entry function '(\S+)' for '(sm_\w+)'", line)
        if m:
            current = {"name": m.group(1), "arch": m.group(2), "spill": 0, "stack": 0, "regs": 0}
            rows.append(current)
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current["stack"] = int(m.group(1))
            current["spill"] = int(m.group(2)) + int(m.group(3))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
    if not rows:
        print("   no ptxas report in the log (was -Xptxas=-v passed?)")
        sys.exit(1)
    names = demangle([r["name"] for r in rows])
    for r, n in zip(rows, names):
        # The kernel's name and its template arguments, without the parameter list.
        r["short"] = re.sub(r"\(.*\)$", "", n).replace("csq::cuda::", "")
    rows.sort(key=lambda r: (-r["spill"], r["arch"], r["short"]))
    spilling = sum(r["spill"] > 0 for r in rows)
    print(f"   {len(rows)} kernels x architectures, {spilling} with spills")
    for r in rows:
        print(f"   {r['arch']:<7} regs {r['regs']:>3}  spill {r['spill']:>4} B  "
              f"stack {r['stack']:>4} B  {r['short']}")


if __name__ == "__main__":
    main(sys.argv[1])
