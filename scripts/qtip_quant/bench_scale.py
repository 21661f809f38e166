# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""Time and size the quantizer at the scale users run it (one GPU).

    python scripts/qtip_quant/bench_scale.py --json $OUT/quantize_scale_h200.json

For SmolLM2-135M, Llama-3.1-8B and Llama-3.1-70B layer shapes at K = 2, 3, 4
it writes a random model of that shape (``layers_timed`` decoder layers,
random bf16 weights of the usual N(0, 0.02) init, a 32000-token vocabulary)
and quantizes it with the streaming driver exactly as a user would: Hessians
from 128 x 2048 random calibration tokens, BlockLDLQ, per-layer fine-tuning
(the defaults: 64 sequences, 5 epochs), one layer per step. Each row runs in
its own process, so its peak host memory (ru_maxrss) and peak GPU memory
(torch.cuda.max_memory_allocated) are its own. The Llama-3.1-8B rows run
with ``--gpu-mem-gb 22`` (checks and batch sizes as on a 24 GB GPU), so their
peak shows whether 8B fits one.

Per row: ``layer_s`` (mean wall time of a timed layer: reading it from the
safetensors file, calibration + Hessians, BlockLDLQ, fine-tuning, saving)
and ``projected_model_min`` = (num_layers * layer_s + k-means table +
checkpoint writing scaled to the real model's size) / 60, with the stage
breakdown. Before the rows: a Viterbi profile (tile-steps per second of the
Triton kernels and of the compiled torch step); after them: the width check
(width_check.py: proxy errors of SmolLM2- and 8B-shaped layers with the same
Hessian statistics).

Rows run in priority order and the JSON is rewritten after each one; the
whole command stops itself before ``--deadline-s`` (default 570 s, for a
10-minute device call) and a rerun with ``--merge`` of the previous JSON
continues with the rows still missing. Needs torch, safetensors, numpy,
transformers and tqdm (no vLLM: the codec comes from this checkout).
"""

import argparse
import datetime
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "qtip_quant"  # noqa: A001

import torch

GiB = 1 << 30
VOCAB = 32000  # the layers do not depend on it; keeps the random models small
LLAMA31_ROPE = {
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "max_position_embeddings": 131072,
}
MODELS: dict[str, dict[str, Any]] = {
    # For a smoke test of this script on a CPU (--rows tiny-K2 --device cpu).
    "tiny": {
        "shape": dict(
            hidden_size=64,
            intermediate_size=128,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            tie_word_embeddings=False,
        ),
        "num_layers": 2,
        "vocab": 512,
        "layers_timed": 2,
        "gpu_mem_gb": None,
    },
    "SmolLM2-135M": {
        "shape": dict(
            hidden_size=576,
            intermediate_size=1536,
            num_attention_heads=9,
            num_key_value_heads=3,
            head_dim=64,
            rope_theta=100000.0,
            max_position_embeddings=8192,
            tie_word_embeddings=True,
        ),
        "num_layers": 30,
        "vocab": 49152,
        "layers_timed": 4,
        "gpu_mem_gb": None,
    },
    "Llama-3.1-8B": {
        "shape": dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
            **LLAMA31_ROPE,
        ),
        "num_layers": 32,
        "vocab": 128256,
        "layers_timed": 1,
        "gpu_mem_gb": 22.0,  # a 24 GB GPU
    },
    "Llama-3.1-70B": {
        "shape": dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_attention_heads=64,
            num_key_value_heads=8,
            head_dim=128,
            tie_word_embeddings=False,
            **LLAMA31_ROPE,
        ),
        "num_layers": 80,
        "vocab": 128256,
        "layers_timed": 1,
        "gpu_mem_gb": None,
    },
}
# Processing order: the profile, the target (8B at K=2), then the
# other shapes and bit widths, the width check last.
ROWS = [
    ("Llama-3.1-8B", 2),
    ("Llama-3.1-70B", 2),
    ("SmolLM2-135M", 2),
    ("Llama-3.1-8B", 3),
    ("Llama-3.1-8B", 4),
    ("SmolLM2-135M", 3),
    ("SmolLM2-135M", 4),
    ("Llama-3.1-70B", 3),
    ("Llama-3.1-70B", 4),
]


def row_name(model: str, K: int) -> str:
    return f"{model}-K{K}"


def hf_config(model: str, layers: int, vocab: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        **MODELS[model]["shape"],
    }


def make_random_model(path: Path, model: str, layers: int, device: str) -> None:
    """config.json and one safetensors file per decoder layer (plus one for
    the embeddings), random N(0, 0.02) bf16 weights, unit norms."""
    from safetensors.torch import save_file

    from .codec import qtip_checkpoint

    config = hf_config(model, layers, VOCAB)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(0)
    h = config["hidden_size"]

    def randn(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, device=device) * 0.02
        return x.to(torch.bfloat16).cpu()

    weight_map = {}
    head = {"model.embed_tokens.weight": randn(VOCAB, h)}
    head["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    if not config["tie_word_embeddings"]:
        head["lm_head.weight"] = randn(VOCAB, h)
    files = [("model-head.safetensors", head)]
    shapes = qtip_checkpoint.llama_projection_shapes(argparse.Namespace(**config))
    for i in range(layers):
        tensors = {f"model.layers.{i}.{p}.weight": randn(*s) for p, s in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(
                h, dtype=torch.bfloat16
            )
        files.append((f"model-layer{i:03d}.safetensors", tensors))
    for name, tensors in files:
        save_file(tensors, str(path / name), {"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    index = {"metadata": {}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    (path / "config.json").write_text(json.dumps(config, indent=2))


# ---------------------------------------------------------------------------
# Worker processes
# ---------------------------------------------------------------------------


def _peaks() -> dict[str, Any]:
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out: dict[str, Any] = {"peak_host_gib": rss_kib / (1 << 20)}
    if torch.cuda.is_available():
        out["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GiB
        out["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        out["gpu"] = torch.cuda.get_device_name()
    return out


def worker_row(spec: dict[str, Any]) -> dict[str, Any]:
    """Quantize the random model of spec (in this process) and report."""
    from .quantize import QuantizeOptions, RunOptions, quantize_model

    device = spec["device"]
    gen = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, VOCAB, (spec["calib_seqs"], spec["seqlen"]), generator=gen)
    options = QuantizeOptions(K=spec["K"], hessian=True, finetune=True)
    run = RunOptions(
        device=device,
        layers_per_step=1,
        gpu_mem_gb=spec["gpu_mem_gb"],
        viterbi=spec.get("viterbi"),
    )
    work = Path(spec["dir"])
    stats = quantize_model(
        spec["model_dir"],
        work / "out",
        seqs,
        options,
        run,
        work_dir=work / "work",
        calibration_id="bench-scale random tokens",
    )
    return {"stats": stats, **_peaks()}


def worker_profile(device: str) -> dict[str, Any]:
    """Tile-steps per second of the Viterbi backends at typical batch sizes
    (256 tiles: an 8B down_proj column block; 2432: the other 8B blocks)."""
    from .codebook import initial_tlut
    from .codec import QTIPCodeParams, qtip_utils
    from .viterbi import ViterbiSolver, checked_backend

    rows: list[dict[str, Any]] = []
    if device != "cuda":
        return {"viterbi_profile": rows}
    for K in (2, 3, 4):
        params = QTIPCodeParams(K=K)
        tlut = initial_tlut(params, samples=1 << 16, iters=5).half().float()
        table = qtip_utils.decode_table(params, tlut.to(device), device=device)
        backends = [checked_backend(table, 16, 2 * K, "triton")]
        if K == 2:
            backends.append("compile")
        for backend in backends:
            for batch in (256, 2432):
                gen = torch.Generator().manual_seed(batch)
                targets = torch.randn(batch, 128, 2, generator=gen).to(device)
                solver = ViterbiSolver(
                    table, 16, 2 * K, mem_bytes=8 * GiB, backend=backend
                )
                t0 = time.time()
                solver(targets)  # compile / capture
                torch.cuda.synchronize()
                warm = time.time() - t0
                t0 = time.time()
                calls = 5
                for _ in range(calls):
                    solver(targets)
                torch.cuda.synchronize()
                per_call = (time.time() - t0) / calls
                solver.close()
                rows.append(
                    {
                        "K": K,
                        "backend": backend,
                        "tiles": batch,
                        "call_ms": per_call * 1e3,
                        "first_call_s": warm,
                        # Two passes of 128 steps over 2**16 states per tile.
                        "tile_steps_per_s": batch * 256 / per_call,
                    }
                )
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"viterbi_profile": rows, "gpu": torch.cuda.get_device_name()}


def worker_width(device: str) -> dict[str, Any]:
    from .width_check import width_check

    if device != "cuda":  # a smoke test: 16 rows of o_proj at K=2
        return {"width_check": width_check((2,), rows=16, groups=("o",))}
    return {"width_check": width_check(device=device, backend="triton")}


# ---------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------


def _run_worker(kind: str, payload: Any, timeout: float) -> dict[str, Any] | None:
    """Run this file as a worker process (the parent never touches the GPU);
    its last stdout line is the JSON result. None: stopped at the deadline."""
    arg = f"{kind}:{json.dumps(payload)}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", arg]
    print(f"+ worker {kind} {payload if kind != 'row' else payload['dir']}", flush=True)
    try:
        proc = subprocess.run(
            cmd, stdout=subprocess.PIPE, text=True, timeout=max(1.0, timeout)
        )
    except subprocess.TimeoutExpired:
        print(f"  stopped at the deadline ({timeout:.0f} s)", flush=True)
        return None
    lines = proc.stdout.strip().splitlines()
    print("\n".join(lines[:-1]), flush=True)
    if proc.returncode != 0 or not lines:
        print(f"  failed (exit {proc.returncode})", flush=True)
        return {"error": f"exit {proc.returncode}: {lines[-1] if lines else ''}"}
    return json.loads(lines[-1])


def _row_result(model: str, K: int, spec: dict[str, Any], out: dict[str, Any]):
    from transformers import LlamaConfig

    from .resources import checkpoint_bytes

    stats = out["stats"]
    layers = list(stats["layers"].values())
    mean = {
        key: sum(layer.get(key, 0.0) for layer in layers) / len(layers)
        for key in ("layer_s", "calibration_s", "quantize_s", "finetune_s")
    }
    info = MODELS[model]
    real = LlamaConfig(**hf_config(model, info["num_layers"], info["vocab"]))
    bench = LlamaConfig(**hf_config(model, len(layers), VOCAB))
    write_scale = checkpoint_bytes(real, K) / checkpoint_bytes(bench, K)
    fixed = stats.get("tlut_s", 0.0) + stats["write_s"] * write_scale
    proxies = [p for layer in layers for p in layer["proxy"].values()]
    return {
        "model": model,
        "K": K,
        "layers_timed": len(layers),
        "layer_s": mean["layer_s"],
        "projected_model_min": (info["num_layers"] * mean["layer_s"] + fixed) / 60,
        "peak_gpu_gib": out.get("peak_gpu_gib"),
        "peak_host_gib": out["peak_host_gib"],
        "peak_gpu_reserved_gib": out.get("peak_gpu_reserved_gib"),
        "estimated_layer_gpu_gib": stats["run"]["estimated_layer_gpu_gib"],
        "gpu_cap_gib": spec["gpu_mem_gb"],
        "calibration_s": mean["calibration_s"],
        "ldlq_s": mean["quantize_s"],
        "finetune_s": mean["finetune_s"],
        "tlut_s": stats.get("tlut_s"),
        "write_s": stats["write_s"],
        "viterbi": stats["run"]["viterbi"],
        "mean_proxy": sum(proxies) / len(proxies),
        "options": f"Hessians ({spec['calib_seqs']} x {spec['seqlen']} tokens), "
        "BlockLDLQ, per-layer fine-tuning (64 seqs, 5 epochs), --layers-per-step 1",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", default="benchmarks/quantize_scale_h200.json")
    parser.add_argument("--merge", help="earlier JSON whose rows are kept")
    parser.add_argument("--rows", nargs="+", help="e.g. Llama-3.1-8B-K2 profile width")
    parser.add_argument("--root", default="/tmp/qtip-bench", help="models, work dirs")
    parser.add_argument("--deadline-s", type=float, default=570.0)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--calib-seqs", type=int, default=128)
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--layers-timed", type=int, help="override per model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        kind, _, payload = args.worker.partition(":")
        spec = json.loads(payload)
        if kind == "row":
            out = worker_row(spec)
        elif kind == "make":
            make_random_model(
                Path(spec["dir"]), spec["model"], spec["layers"], spec["device"]
            )
            out = {}
        elif kind == "profile":
            out = worker_profile(spec["device"])
        else:
            out = worker_width(spec["device"])
        print(json.dumps(out), flush=True)
        return

    start = time.time()
    root = Path(args.root)
    out_file = Path(args.json)
    result: dict[str, Any] = {"rows": []}
    for earlier in (args.merge, args.json):
        if earlier and Path(earlier).exists():
            result = json.loads(Path(earlier).read_text())
            break
    result["date"] = datetime.date.today().isoformat()
    result["torch"] = torch.__version__

    def save() -> None:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(result, indent=2) + "\n")

    def left() -> float:
        return args.deadline_s - (time.time() - start)

    done = {row_name(r["model"], r["K"]) for r in result["rows"] if "error" not in r}
    wanted = args.rows or ["profile", *(row_name(m, k) for m, k in ROWS), "width"]
    for name in wanted:
        if left() < 20:
            print("deadline reached: rerun with --merge to continue", flush=True)
            break
        if name in ("profile", "width"):
            key = "viterbi_profile" if name == "profile" else "width_check"
            if key in result:
                continue
            out = _run_worker(name, {"device": args.device}, left())
            if out is None:
                break
            if "error" not in out:
                result.update(out)
                save()
            continue
        if name in done:
            continue
        model, _, k = name.rpartition("-K")
        info = MODELS[model]
        layers = args.layers_timed or info["layers_timed"]
        model_dir = root / "models" / f"{model}-{layers}"
        if not (model_dir / "config.json").exists():
            shutil.rmtree(model_dir, ignore_errors=True)
            made = _run_worker(
                "make",
                {
                    "dir": str(model_dir),
                    "model": model,
                    "layers": layers,
                    "device": args.device,
                },
                left(),
            )
            if made is None or "error" in made:
                break
        row_dir = root / name
        shutil.rmtree(row_dir, ignore_errors=True)  # rows restart whole
        spec = {
            "model_dir": str(model_dir),
            "dir": str(row_dir),
            "K": int(k),
            "device": args.device,
            "gpu_mem_gb": info["gpu_mem_gb"] if args.device == "cuda" else None,
            "calib_seqs": args.calib_seqs,
            "seqlen": args.seqlen,
        }
        out = _run_worker("row", spec, left())
        if out is None:
            break
        if "gpu" in out:
            result["gpu"] = out.pop("gpu")
        result["rows"] = [
            r for r in result["rows"] if row_name(r["model"], r["K"]) != name
        ]
        if "error" in out:
            result["rows"].append({"model": model, "K": int(k), **out})
        else:
            row = _row_result(model, int(k), spec, out)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        order = {row_name(m, kk): i for i, (m, kk) in enumerate(ROWS)}
        result["rows"].sort(key=lambda r: order.get(row_name(r["model"], r["K"]), 99))
        save()
        shutil.rmtree(row_dir, ignore_errors=True)
    missing = [
        n
        for n in wanted
        if n not in {row_name(r["model"], r["K"]) for r in result["rows"]}
        and n not in ("profile", "width")
    ]
    result["complete"] = not missing and "width_check" in result
    save()
    print(f"wrote {out_file}; {'complete' if result['complete'] else 'INCOMPLETE'}")
    if missing:
        print("missing rows:", " ".join(missing))


if __name__ == "__main__":
    main()
