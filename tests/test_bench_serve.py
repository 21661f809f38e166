# SPDX-License-Identifier: Apache-2.0
"""scripts/bench_serve.py records a concurrency level only when every request
of its `vllm bench serve` run completed (a run against the wrong server once
recorded 0 tok/s as a measurement)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import bench_serve  # noqa: E402


def fake_bench(monkeypatch, completed: int, errors: list[str]) -> None:
    """`vllm bench serve` stand-in: writes the result file it would write."""

    def run(cmd, **kwargs):
        result_dir = Path(cmd[cmd.index("--result-dir") + 1])
        name = cmd[cmd.index("--result-filename") + 1]
        prompts = int(cmd[cmd.index("--num-prompts") + 1])
        result = {
            "completed": completed,
            "failed": prompts - completed,
            "output_throughput": 128.0 * completed / 2.0,
            "median_ttft_ms": 12.34,
            "median_tpot_ms": 4.567,
            "errors": errors,
        }
        (result_dir / name).write_text(json.dumps(result))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(bench_serve.subprocess, "run", run)


def test_complete_run_is_recorded(monkeypatch, tmp_path):
    fake_bench(monkeypatch, completed=64, errors=[""] * 64)
    row = bench_serve.bench(tmp_path / "model", 16, tmp_path)
    assert row == {
        "concurrency": 16,
        "output_tok_s": 4096.0,
        "median_ttft_ms": 12.3,
        "median_tpot_ms": 4.57,
    }


def test_failed_requests_are_an_error(monkeypatch, tmp_path):
    errors = [""] * 3 + ["The model `/tmp/x/llama` does not exist."]
    fake_bench(monkeypatch, completed=3, errors=errors)
    with pytest.raises(RuntimeError, match="3 of 4 requests.*does not exist"):
        bench_serve.bench(tmp_path / "model", 1, tmp_path)
