#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Turn the QTIP series into the pull-request branch of a vLLM v0.26.0 clone.

    make_pr.py --vllm-dir <vLLM git clone> [--branch qtip] [--force]

The branch starts at the clone's v0.26.0 tag and holds the series as a few
commits in vLLM's style (COMMITS below): a [Quantization], [Kernel] or [Doc]
title, a body, and the trailers vLLM's contributing guide asks for
(Co-authored-by for AI assistance, Signed-off-by for the DCO, from the
clone's git user.name / user.email). Its tree is exactly what `make apply`
lays on v0.26.0: every overlay file, the kernels and every patch.

The commits are built with git plumbing (a private index, hash-object,
commit-tree): the clone's checkout, index and current branch are left alone.
The pull request's text is PR_DESCRIPTION.md in this repository.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_tree  # noqa: E402

BASE_TAG = f"v{vllm_tree.PINNED_VERSION}"
DEFAULT_BRANCH = "qtip"
# vLLM's contributing guide asks AI-assisted commits to say so in a trailer.
DEFAULT_CO_AUTHOR = "Claude <noreply@anthropic.com>"


@dataclasses.dataclass(frozen=True)
class Commit:
    title: str
    body: str
    # Patches (by number, e.g. "0001") folded into this commit.
    patches: tuple[str, ...] = ()


COMMITS = (
    Commit(
        "[Quantization] QTIP reference codec",
        "A pure-PyTorch decoder of QTIP checkpoints (Tseng et al., NeurIPS\n"
        "2024): the bitshift-trellis codes (HYB and the computed codes), both\n"
        "trellis bit layouts, QTIP's randomized Hadamard transform with its\n"
        "exact H_K factors, and the reference forward. It is the ground truth\n"
        "the kernels and the loader are tested against, and the forward of\n"
        "layers the kernels do not cover. The tests check it bit for bit\n"
        "against golden vectors of the reference implementation.",
    ),
    Commit(
        "[Kernel] QTIP trellis-decode GEMM and Hadamard kernels",
        "Built into _C_stable_libtorch on the stable libtorch ABI (ops\n"
        "torch.ops._qtip_C.*): a persistent trellis-decode + tensor-core GEMM\n"
        "that decodes each weight once per 64 batch rows, with deterministic\n"
        "split-K, a decode to fp16 followed by cuBLAS from 256 rows on, and a\n"
        "Hadamard kernel with the sign/scale vectors folded in; one call runs\n"
        "every shard of a fused q/k/v or gate/up layer. Python wrappers with\n"
        "fake (meta) implementations for torch.compile, and kernel tests\n"
        "against the reference codec (opcheck, CUDA graphs, torch.compile,\n"
        "determinism).",
        patches=("0003",),
    ),
    Commit(
        "[Quantization] Add the QTIP quantization method",
        "QTIPConfig and QTIPLinearMethod: every projection of vLLM's fused\n"
        "qkv_proj / gate_up_proj keeps its own trellis, sign vectors and\n"
        "table, loaded shard by shard through vLLM's parameter classes, with\n"
        "errors that name the checkpoint tensor at fault; split_for_tp\n"
        "checkpoints shard over tensor-parallel ranks. Layers run the CUDA\n"
        "kernels when they can and otherwise the reference decoder, with a\n"
        "logged reason. Tests on CPU (layers, whole Llama models, TP=2 over\n"
        "gloo) and on GPU (generation against an HF reference model).",
        patches=("0001",),
    ),
    Commit(
        "[Quantization] Detect QTIP checkpoints by their quip_params",
        "The published relaxml QTIP checkpoints have no quantization_config:\n"
        "their parameters sit in a top-level quip_params dict of config.json.\n"
        "Turn it into a quantization_config with quant_method 'qtip' so they\n"
        "load with no flag.",
        patches=("0002",),
    ),
    Commit(
        "[Doc] Add the QTIP quantization page",
        "Which checkpoints load and how, quantizing a model, supported codes\n"
        "and shapes, parallelism, speed by batch size and limitations; QTIP in\n"
        "the method list and the supported-hardware table.",
        patches=("0004",),
    ),
)

# Series files -> commit (index into COMMITS); the first matching pattern
# wins, so specific patterns come before the general ones.
FILE_RULES = (
    ("vllm/model_executor/layers/quantization/utils/qtip_*", 0),
    ("tests/quantization/test_qtip_reference.py", 0),
    ("tests/quantization/reference_qtip.py", 0),
    ("tests/quantization/qtip_goldens/*", 0),
    ("csrc/*", 1),
    ("cmake/*", 1),
    ("vllm/_qtip_ops.py", 1),
    ("tests/kernels/*", 1),
    ("tests/quantization/test_qtip_detection.py", 3),
    ("docs/*", 4),
    ("vllm/*", 2),
    ("tests/*", 2),
)


class PRError(Exception):
    """A problem the user has to fix; printed without a traceback."""


def git(repo: Path, *args: str, stdin: bytes | None = None, env=None) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args],
        input=stdin,
        capture_output=True,
        env=env,
    )
    if out.returncode != 0:
        raise PRError(f"git {' '.join(args)} failed:\n{out.stderr.decode()}")
    return out.stdout.decode().strip()


def assign_files(files: list[str]) -> list[list[str]]:
    """Series files grouped per commit, by FILE_RULES."""
    groups: list[list[str]] = [[] for _ in COMMITS]
    for rel in files:
        for pattern, index in FILE_RULES:
            if fnmatch.fnmatch(rel, pattern):
                groups[index].append(rel)
                break
        else:
            raise PRError(
                f"{rel} belongs to no commit: add a rule to FILE_RULES in "
                "scripts/make_pr.py"
            )
    return groups


def plan(series: dict[str, str]) -> list[tuple[str, list[str]]]:
    """(message without trailers, patch names) of every commit, in order.

    Patches named in COMMITS are folded into their commit; any other patch
    becomes a commit of its own, with its own message, after them.
    """
    by_number = {name[:4]: name for name in series}
    used: set[str] = set()
    commits = []
    for commit in COMMITS:
        names = []
        for number in commit.patches:
            if number not in by_number:
                raise PRError(f"COMMITS names patch {number}, which patches/ lacks")
            names.append(by_number[number])
            used.add(by_number[number])
        commits.append((f"{commit.title}\n\n{commit.body}\n", names))
    for name, text in series.items():
        if name not in used:
            _, _, message = vllm_tree.parse_header(text)
            commits.append((message, [name]))
    return commits


def patched_contents(
    repo: Path, base: str, patches: list[tuple[str, str]]
) -> dict[str, dict[str, bytes | None]]:
    """Per patch, the files it touches after it (and the ones before it)."""
    touched = list(
        dict.fromkeys(p for _, t in patches for p in vllm_tree.patch_paths(t))
    )
    result: dict[str, dict[str, bytes | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tree"
        work.mkdir()
        for rel in touched:
            blob = subprocess.run(
                ["git", "-C", str(repo), "show", f"{base}:{rel}"],
                capture_output=True,
            )
            if blob.returncode == 0:
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                (work / rel).write_bytes(blob.stdout)
        for name, text in patches:
            vllm_tree.run_git_apply(work, text, name)
            result[name] = {
                rel: (work / rel).read_bytes() if (work / rel).is_file() else None
                for rel in vllm_tree.patch_paths(text)
            }
    return result


def make_branch(
    repo: Path, branch: str, force: bool, co_author: str | None
) -> list[str]:
    """Build the branch; returns the commit ids, oldest first."""
    if not (repo / ".git").exists():
        raise PRError(f"{repo} is not a git clone of vLLM")
    try:
        base = git(repo, "rev-parse", "--verify", f"{BASE_TAG}^{{commit}}")
    except PRError as e:
        raise PRError(
            f"{repo} has no {BASE_TAG} tag; the series is made for vLLM "
            f"{vllm_tree.PINNED_VERSION} (git fetch --tags)"
        ) from e
    exists = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--verify", "-q", f"refs/heads/{branch}"],
        capture_output=True,
    )
    if exists.returncode == 0 and not force:
        raise PRError(f"branch {branch} exists in {repo}; use --force to replace it")
    current = subprocess.run(
        ["git", "-C", str(repo), "symbolic-ref", "-q", "HEAD"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    if current == f"refs/heads/{branch}":
        raise PRError(f"{branch} is checked out in {repo}; check out another branch")
    name = subprocess.run(
        ["git", "-C", str(repo), "config", "user.name"], capture_output=True, text=True
    ).stdout.strip()
    email = subprocess.run(
        ["git", "-C", str(repo), "config", "user.email"], capture_output=True, text=True
    ).stdout.strip()
    if not name or not email:
        raise PRError(
            f"set git user.name and user.email in {repo}: vLLM's DCO needs a "
            "Signed-off-by with the submitter's real name and address"
        )

    series = vllm_tree.load_series("source")
    overlay = vllm_tree.overlay_files("source")
    commits = plan(series)
    groups = assign_files(sorted(overlay))
    ordered = [(n, series[n]) for _, names in commits for n in names]
    contents = patched_contents(repo, base, ordered)

    env = dict(
        os.environ,
        GIT_AUTHOR_NAME=name,
        GIT_AUTHOR_EMAIL=email,
        GIT_COMMITTER_NAME=name,
        GIT_COMMITTER_EMAIL=email,
    )
    trailers = []
    if co_author:
        trailers.append(f"Co-authored-by: {co_author}")
    trailers.append(f"Signed-off-by: {name} <{email}>")
    parent = base
    made = []
    with tempfile.TemporaryDirectory() as tmp:
        env["GIT_INDEX_FILE"] = str(Path(tmp) / "index")
        git(repo, "read-tree", base, env=env)
        for i, (message, names) in enumerate(commits):
            files: dict[str, bytes | None] = {}
            for rel in groups[i] if i < len(groups) else []:
                files[rel] = overlay[rel].read_bytes()
            for patch in names:
                files.update(contents[patch])
            for rel, data in sorted(files.items()):
                if data is None:
                    git(repo, "update-index", "--force-remove", "--", rel, env=env)
                    continue
                blob = git(repo, "hash-object", "-w", "--stdin", stdin=data)
                mode = _mode(repo, base, rel, overlay.get(rel))
                git(
                    repo,
                    "update-index",
                    "--add",
                    "--cacheinfo",
                    f"{mode},{blob},{rel}",
                    env=env,
                )
            tree = git(repo, "write-tree", env=env)
            full = message.rstrip("\n") + "\n\n" + "\n".join(trailers) + "\n"
            parent = git(
                repo, "commit-tree", tree, "-p", parent, stdin=full.encode(), env=env
            )
            made.append(parent)
    git(repo, "update-ref", f"refs/heads/{branch}", parent)
    return made


def _mode(repo: Path, base: str, rel: str, source: Path | None) -> str:
    """The file mode: the base tree's for a patched file, else the source's."""
    if source is None:
        line = git(repo, "ls-tree", base, "--", rel)
        if line:
            return line.split()[0]
        return "100644"
    return "100755" if os.access(source, os.X_OK) else "100644"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vllm-dir", type=Path, required=True)
    parser.add_argument("--branch", default=DEFAULT_BRANCH)
    parser.add_argument("--force", action="store_true", help="replace the branch")
    parser.add_argument(
        "--co-author",
        default=DEFAULT_CO_AUTHOR,
        help="Co-authored-by trailer ('' for none)",
    )
    args = parser.parse_args(argv)
    repo = args.vllm_dir.resolve()
    try:
        made = make_branch(repo, args.branch, args.force, args.co_author or None)
    except (PRError, vllm_tree.TreeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"branch {args.branch} in {repo}: {len(made)} commits on {BASE_TAG}")
    print(git(repo, "log", "--oneline", f"{BASE_TAG}..{args.branch}"))
    print(f"pull request text: {vllm_tree.REPO / 'PR_DESCRIPTION.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
