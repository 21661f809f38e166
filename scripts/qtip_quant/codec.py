# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The reference codec and checkpoint writer, from the applied vLLM tree.

The quantizer shares them with vLLM's loader, so what it writes is exactly
what the loader reads. They ship with the QTIP patch series: a plain vLLM
0.26.0 lacks them. Every module of the quantizer imports them from here.

Without any vLLM installed (a bare GPU host running bench_scale.py), they
are taken from this checkout's ``vllm_overlay/`` (they need only torch and
safetensors); the reference model (``build_reference_model``) still needs
vLLM.
"""

import sys
from pathlib import Path

try:
    import vllm  # noqa: F401
except ModuleNotFoundError:
    _OVERLAY = Path(__file__).resolve().parents[2] / "vllm_overlay"
    # A namespace package over the overlay: no vllm/__init__.py there.
    sys.path.append(str(_OVERLAY))

try:
    from vllm.model_executor.layers.quantization.utils import (
        qtip_checkpoint,
        qtip_utils,
    )
except ImportError as error:  # pragma: no cover - environment problem
    raise ImportError(
        "the QTIP quantizer needs vLLM with the QTIP series applied "
        "(vllm.model_executor.layers.quantization.utils.qtip_utils and "
        "qtip_checkpoint): run `make apply build`, or put the applied tree on "
        f"PYTHONPATH ({error})"
    ) from error

QTIPCodeParams = qtip_utils.QTIPCodeParams

__all__ = ["QTIPCodeParams", "qtip_checkpoint", "qtip_utils"]
