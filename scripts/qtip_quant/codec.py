# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The reference codec and checkpoint writer, from the applied vLLM tree.

The quantizer shares them with vLLM's loader, so what it writes is exactly
what the loader reads. They ship with the QTIP patch series: a plain vLLM
0.26.0 lacks them.
"""

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
