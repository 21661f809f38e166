# SPDX-License-Identifier: Apache-2.0
"""Global loads that a kernel issues before griddepcontrol.wait, from its SASS.

    python scripts/check_pdl_loads.py build/qtip-ext/_qtip_C.abi3.so \
        [--kernel REGEX] [--expect-none REGEX]

Under programmatic dependent launch a QTIP kernel starts while its producer
still runs; it may load weights (H_K, trellis, LUT) before
griddepcontrol.wait (SASS ``ACQBULK``), never the producer's output. A
``const __restrict__`` pointer lets the compiler use ld.global.nc
(``LDG.E.CONSTANT``), which declares the data unchanged for the whole kernel,
so ptxas may issue such a load before the wait: it did for the radix-16
transform with split-K partials (twenty-ninth session), which then read
partials the GEMM had not written yet.

Prints, per kernel with a wait, the global loads (LDG, cp.async's LDGSTS,
TMA's UTMALDG) listed before the first wait, in program order (a prologue's
branches are not followed). ``--expect-none`` exits 1 if a kernel matching it
has any: kernels with no weights to prefetch.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

WAIT = "ACQBULK"
# LDG (ld.global, incl. .CONSTANT), LDGSTS (cp.async), UTMALDG (TMA).
GLOBAL_LOAD = re.compile(r"\b(LDG|LDGSTS|UTMALDG)\b")
INSTRUCTION = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")


def find_cuobjdump() -> str | None:
    """cuobjdump from CUDA_HOME, PATH or the one Triton ships."""
    cuda_home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [Path(cuda_home) / "bin" / "cuobjdump"]
    found = shutil.which("cuobjdump")
    if found:
        candidates.append(Path(found))
    try:
        import triton

        candidates.append(
            Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        )
    except ImportError:
        pass
    return next((str(c) for c in candidates if c.is_file()), None)


def demangle(names: list[str]) -> list[str]:
    """C++ names through c++filt where there is one."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run(
        [cxxfilt], input="\n".join(names), capture_output=True, text=True
    ).stdout.splitlines()
    return out if len(out) == len(names) else names


def sass_of(library: str, cuobjdump: str) -> str:
    """The SASS of every kernel in a library or cubin."""
    return subprocess.run(
        [cuobjdump, "-sass", library], capture_output=True, text=True, check=True
    ).stdout


def loads_before_wait(sass: str) -> dict[str, list[str]]:
    """Kernel (mangled name) -> its global loads listed before the first
    wait, for every kernel that waits."""
    result: dict[str, list[str]] = {}
    for block in sass.split("Function : ")[1:]:
        name = block.split("\n", 1)[0].strip()
        early: list[str] = []
        waits = False
        for line in block.split("\n"):
            m = INSTRUCTION.match(line)
            if not m:
                continue
            instruction = m.group(1)
            if WAIT in instruction:
                waits = True
                break
            if GLOBAL_LOAD.search(instruction):
                early.append(instruction)
        if waits:
            result[name] = early
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("library", help="_qtip_C.abi3.so or a cubin")
    parser.add_argument("--kernel", default="", help="only kernels matching")
    parser.add_argument(
        "--expect-none",
        default="",
        help="fail if a kernel matching this regex loads before its wait",
    )
    args = parser.parse_args()
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("error: cuobjdump not found (CUDA_HOME, PATH, triton)", file=sys.stderr)
        return 2
    found = loads_before_wait(sass_of(args.library, cuobjdump))
    kernels = dict(zip(demangle(list(found)), found.values()))
    bad = []
    for name, early in sorted(kernels.items()):
        if not re.search(args.kernel, name):
            continue
        print(f"{len(early):4d}  {name}")
        if args.expect_none and re.search(args.expect_none, name) and early:
            bad.append(name)
            for instruction in early:
                print(f"        {instruction}")
    if bad:
        print(f"error: {len(bad)} kernel(s) load before griddepcontrol.wait")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
