# SPDX-License-Identifier: Apache-2.0
"""scripts/check_pdl_loads.py: no kernel reads its producer's output before
griddepcontrol.wait (the SASS of the built _qtip_C where there is one)."""

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import check_pdl_loads  # noqa: E402

SASS = """
\t\tFunction : _Z6waitsPKf
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDG.E.CONSTANT R2, desc[UR4][R4.64] ;
        /*0020*/                   LDGSTS.E.128 [R6], desc[UR4][R8.64] ;
        /*0030*/                   PREEXIT ;
        /*0040*/                   ACQBULK ;
        /*0050*/                   LDG.E.128.CONSTANT R8, desc[UR4][R2.64] ;
        /*0060*/                   EXIT ;
\t\tFunction : _Z8no_waitsPKf
        /*0000*/                   LDG.E R2, desc[UR4][R4.64] ;
        /*0010*/                   EXIT ;
"""


def test_loads_listed_up_to_the_first_wait():
    found = check_pdl_loads.loads_before_wait(SASS)
    # Kernels without a wait are not under programmatic dependent launch.
    assert list(found) == ["_Z6waitsPKf"]
    assert found["_Z6waitsPKf"] == [
        "LDG.E.CONSTANT R2, desc[UR4][R4.64]",
        "LDGSTS.E.128 [R6], desc[UR4][R8.64]",
    ]


def test_built_radix16_transform_loads_after_its_wait():
    # The radix-16 transform has no weight to prefetch: every global load is
    # of x, its producer's output, and must come after the wait. ptxas moved
    # ld.global.nc loads of x above it in a variant (twenty-ninth session).
    library = REPO / "build" / "qtip-ext" / "_qtip_C.abi3.so"
    if not library.is_file():
        pytest.skip(f"{library} not built (make build)")
    cuobjdump = check_pdl_loads.find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump (CUDA_HOME, PATH or triton)")
    found = check_pdl_loads.loads_before_wait(
        check_pdl_loads.sass_of(str(library), cuobjdump)
    )
    radix16 = {name: early for name, early in found.items() if "sylvester4096" in name}
    assert len(radix16) >= 2, sorted(found)
    assert all(not early for early in radix16.values()), radix16
