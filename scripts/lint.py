#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Run vLLM 0.26.0's own pre-commit checks on the QTIP series.

The series' files (the overlay, the kernels and every file a patch touches)
are checked where they lie in the applied source tree, with the tree's own
configs (pyproject.toml, .clang-format, .markdownlint.yaml) and hooks
(tools/pre_commit/*), by the tool versions vLLM's .pre-commit-config.yaml
pins (requirements-lint.txt). The project's own scripts/ and tests/ get the
same ruff rules (ruff.toml), and typos reads them and our documents too.

    lint.py --tree build/vllm-0.26.0 --venv .venv-lint [--markdownlint BIN]
    lint.py --tree build/vllm-0.26.0 --venv .venv-lint --format

--format rewrites files of this repository instead (ruff check --fix, ruff
format, and clang-format -i with the tree's .clang-format on the kernels).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_tree  # noqa: E402

REPO = vllm_tree.REPO
C_SUFFIXES = (".cu", ".cuh", ".cpp", ".h", ".hpp", ".cc")
REPO_PYTHON = ("scripts", "tests")
# Our own files outside the series that typos reads too.
REPO_TEXT = (
    *REPO_PYTHON,
    "Makefile",
    "README.md",
    "BENCHMARKS.md",
    "PR_DESCRIPTION.md",
)


def series_files(tree: Path) -> list[str]:
    """Tree-relative paths of every file the series adds or edits."""
    manifest = vllm_tree.read_manifest(tree)
    if manifest is None or manifest["kind"] != "source":
        raise vllm_tree.TreeError(
            f"{tree} has no QTIP series applied as a source tree; run `make apply`"
        )
    paths = set(manifest["files"])
    for text in manifest["patches"].values():
        paths.update(vllm_tree.patch_paths(text))
    return sorted(p for p in paths if (tree / p).is_file())


def lint(tree: Path, venv: Path, markdownlint: str | None) -> int:
    files = series_files(tree)
    py = [f for f in files if f.endswith(".py")]
    c = [f for f in files if f.endswith(C_SUFFIXES)]
    md = [f for f in files if f.endswith(".md")]
    bin_dir = venv / "bin"
    python = str(bin_dir / "python")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    def hook(name: str) -> list[str]:
        return [python, f"tools/pre_commit/{name}.py"]

    # (name, command, working directory); each runs only if it has files.
    checks: list[tuple[str, list[str], Path]] = [
        ("ruff check", ["ruff", "check", "--output-format", "concise", *py], tree),
        ("ruff format", ["ruff", "format", "--check", *py], tree),
        # As the mypy-3.10 hook runs it (grouped per directory).
        ("mypy", [*hook("mypy"), "3.10", *py], tree),
        ("typos", ["typos", "--force-exclude", *files], tree),
        ("clang-format", ["clang-format", "--dry-run", "--Werror", *c], tree),
        ("spdx header", [*hook("check_spdx_header"), *py], tree),
        ("forbidden imports", [*hook("check_forbidden_imports"), *py], tree),
        ("torch.cuda calls", [*hook("check_torch_cuda"), *py], tree),
        ("lazy root imports", hook("check_init_lazy_imports"), tree),
        ("boolean with", [*hook("check_boolean_context_manager"), *py], tree),
        ("config docstrings", [*hook("validate_config"), *py], tree),
        (
            "ruff check (repo)",
            ["ruff", "check", "--output-format", "concise", *REPO_PYTHON],
            REPO,
        ),
        ("ruff format (repo)", ["ruff", "format", "--check", *REPO_PYTHON], REPO),
        (
            "typos (repo)",
            ["typos", "--config", str(tree / "pyproject.toml"), *REPO_TEXT],
            REPO,
        ),
    ]
    if markdownlint:
        checks.append(("markdownlint", [markdownlint, *md], tree))
    failed = []
    spaced = [f for f in files if " " in f]
    if spaced:
        print(f"file names with spaces: {spaced}")
        failed.append("file names")
    report = []
    for name, cmd, cwd in checks:
        start = time.monotonic()
        print(f"--- {name}", flush=True)
        rc = subprocess.run(cmd, cwd=cwd, env=env).returncode
        report.append((name, rc, time.monotonic() - start))
        if rc != 0:
            failed.append(name)
    print(f"\nvLLM pre-commit checks on {len(files)} series files:")
    for name, rc, seconds in report:
        print(f"  {'ok    ' if rc == 0 else 'FAILED'} {name} ({seconds:.1f} s)")
    if not markdownlint:
        print("  skipped markdownlint (no markdownlint-cli2; needs node)")
    if failed:
        print(f"lint failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def format_repo(tree: Path, venv: Path) -> int:
    """Fix what the formatters can fix, in this repository's files."""
    bin_dir = venv / "bin"
    kernels = sorted(
        str(p)
        for p in (REPO / vllm_tree.KERNEL_DIR).rglob("*")
        if p.suffix in C_SUFFIXES
    )
    style = tree / ".clang-format"
    if not style.is_file():
        raise vllm_tree.TreeError(f"{style} not found; run `make fetch`")
    python = ["vllm_overlay", *REPO_PYTHON]
    ruff = str(bin_dir / "ruff")
    steps: list[list[str]] = [
        [ruff, "check", "--fix", "--output-format", "concise", *python],
        [ruff, "format", *python],
        [str(bin_dir / "clang-format"), "-i", f"--style=file:{style}", *kernels],
    ]
    rc = 0
    for cmd in steps:
        print("+", " ".join(cmd[:4]), "...", flush=True)
        rc |= subprocess.run(cmd, cwd=REPO).returncode
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, required=True)
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--markdownlint", help="markdownlint-cli2 executable")
    parser.add_argument("--format", action="store_true", help="fix, do not check")
    args = parser.parse_args(argv)
    tree, venv = args.tree.resolve(), args.venv.resolve()
    try:
        if args.format:
            return format_repo(tree, venv)
        return lint(tree, venv, args.markdownlint)
    except vllm_tree.TreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
