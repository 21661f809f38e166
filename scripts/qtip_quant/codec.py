# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The reference codec (vLLM) and the checkpoint writer (the QTIP tests).

The quantizer shares them with vLLM's loader and tests, so what it writes is
exactly what the loader reads: ``qtip_utils`` is the decoder of the applied
vLLM tree (a plain vLLM 0.26.0 lacks it), and ``qtip_checkpoint`` is
``tests/quantization/reference_qtip.py`` of the series (encoder, dense
dequantization, checkpoint writer and HF reference model), loaded from this
repository's overlay. Every module of the quantizer imports them from here.

Without any vLLM installed (a bare GPU host running bench_scale.py), the
decoder is taken from this checkout's ``vllm_overlay/`` (it needs only torch
and safetensors); the reference model (``build_reference_model``) still
needs vLLM.
"""

import importlib.util
import sys
from pathlib import Path

try:
    import vllm  # noqa: F401
except ModuleNotFoundError:
    _OVERLAY = Path(__file__).resolve().parents[2] / "vllm_overlay"
    # A namespace package over the overlay: no vllm/__init__.py there.
    sys.path.append(str(_OVERLAY))

try:
    from vllm.model_executor.layers.quantization.utils import qtip_utils
except ImportError as error:  # pragma: no cover - environment problem
    raise ImportError(
        "the QTIP quantizer needs vLLM with the QTIP series applied "
        "(vllm.model_executor.layers.quantization.utils.qtip_utils): run "
        f"`make apply build`, or put the applied tree on PYTHONPATH ({error})"
    ) from error

_REFERENCE = (
    Path(__file__).resolve().parents[2]
    / "vllm_overlay/tests/quantization/reference_qtip.py"
)


def _load_reference():
    name = "qtip_vllm_reference_qtip"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _REFERENCE)
        assert spec is not None and spec.loader is not None, _REFERENCE
        module = importlib.util.module_from_spec(spec)
        # Registered first: dataclasses look their module up while defined.
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


qtip_checkpoint = _load_reference()
QTIPCodeParams = qtip_utils.QTIPCodeParams

__all__ = ["QTIPCodeParams", "qtip_checkpoint", "qtip_utils"]
