#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""Lay the QTIP series onto a vLLM 0.26.0 tree, take it off again, or
regenerate the series from an edited tree.

A *source tree* (the pinned sdist or a git clone) gets everything: the
overlay, the kernels in csrc/libtorch_stable/quantization/qtip and every
patch. An *installed package* (a site-packages directory holding vllm/) gets
the Python part only: the overlay's vllm/ files and the patches that touch
nothing outside vllm/.

What was laid is recorded in MANIFEST_NAME at the tree root, with the patch
texts, so that `unapply` can reverse exactly what `apply` did. Patches are
applied to scratch copies first: a patch that does not apply stops the run
before anything in the tree is written.

Only the standard library and the `git` executable are needed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OVERLAY_DIR = REPO / "vllm_overlay"
KERNEL_DIR = Path(
    "csrc/libtorch_stable/quantization/qtip"
)  # same path in our repo and the tree
PATCH_DIR = REPO / "patches"
MANIFEST_NAME = ".qtip_vllm_applied.json"
PINNED_VERSION = "0.26.0"
SDIST_NAME = f"vllm-{PINNED_VERSION}.tar.gz"
SDIST_SHA256 = "23e9fa19d7e20ce7dcc1c074d41503e2116d23f19e688f5d5ea91b741f958502"


class TreeError(Exception):
    """A problem the user has to fix; printed without a traceback."""


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Fetching the pinned sdist
# --------------------------------------------------------------------------


def fetch(dest: Path, cache: Path, python: str) -> Path:
    """Unpack the pinned vLLM sdist into dest/vllm-0.26.0 and return that path.

    The sdist comes from the package index through pip (no host name here)
    and is checked against its pinned sha256 before it is unpacked.
    """
    tree = dest / f"vllm-{PINNED_VERSION}"
    if (tree / "setup.py").is_file():
        print(f"vLLM {PINNED_VERSION} source tree already at {tree}")
        return tree
    archive = cache / SDIST_NAME
    if not archive.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        # setup.py imports torch and needs a version override to produce
        # metadata; VLLM_TARGET_DEVICE=empty keeps it from looking for CUDA.
        env = dict(
            os.environ,
            VLLM_TARGET_DEVICE="empty",
            VLLM_VERSION_OVERRIDE=PINNED_VERSION,
        )
        cmd = [
            python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--no-build-isolation",
            f"vllm=={PINNED_VERSION}",
            "-d",
            str(cache),
        ]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)
    digest = sha256_file(archive)
    if digest != SDIST_SHA256:
        raise TreeError(
            f"{archive}: sha256 {digest} does not match the pinned "
            f"vLLM {PINNED_VERSION} sdist ({SDIST_SHA256}); delete it and retry"
        )
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        os.replace(Path(tmp) / f"vllm-{PINNED_VERSION}", tree)
    print(f"unpacked vLLM {PINNED_VERSION} into {tree}")
    return tree


# --------------------------------------------------------------------------
# Looking at a tree
# --------------------------------------------------------------------------


def tree_kind(tree: Path) -> str:
    """'source' for an sdist or clone, 'installed' for site-packages."""
    if not (tree / "vllm" / "__init__.py").is_file():
        raise TreeError(f"{tree} holds no vllm/ package: not a vLLM tree")
    if (tree / "setup.py").is_file() and (tree / "CMakeLists.txt").is_file():
        return "source"
    return "installed"


def tree_version(tree: Path) -> str | None:
    """The vLLM release a tree holds, without any +local suffix."""
    candidates: list[str] = []
    pkg_info = tree / "PKG-INFO"
    if pkg_info.is_file():
        m = re.search(r"^Version: (\S+)", pkg_info.read_text(), re.M)
        if m:
            candidates.append(m.group(1))
    for dist in sorted(tree.glob("vllm-*.dist-info")):
        m = re.search(r"^Version: (\S+)", (dist / "METADATA").read_text(), re.M)
        if m:
            candidates.append(m.group(1))
    if not candidates and (tree / ".git").exists():
        out = subprocess.run(
            ["git", "-C", str(tree), "describe", "--tags", "--exact-match"],
            capture_output=True,
            text=True,
        )
        if out.returncode == 0:
            candidates.append(out.stdout.strip().lstrip("v"))
    if not candidates:
        version_py = tree / "vllm" / "_version.py"
        if version_py.is_file():
            m = re.search(
                r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)",
                version_py.read_text(),
            )
            if m:
                candidates.append(m.group(1))
    return candidates[0].split("+")[0] if candidates else None


def check_version(tree: Path) -> None:
    found = tree_version(tree)
    if found is None:
        raise TreeError(
            f"cannot tell which vLLM release {tree} holds (no PKG-INFO, "
            f"dist-info, git tag or vllm/_version.py); the QTIP series needs "
            f"vLLM {PINNED_VERSION}"
        )
    if found != PINNED_VERSION:
        raise TreeError(
            f"{tree} holds vLLM {found}, but the QTIP series is made for "
            f"vLLM {PINNED_VERSION}; check out v{PINNED_VERSION} or leave "
            f"VLLM_DIR unset to use the pinned sdist"
        )


# --------------------------------------------------------------------------
# The series
# --------------------------------------------------------------------------


def patch_paths(text: str) -> list[str]:
    """Files a git patch touches, in order of appearance."""
    return list(dict.fromkeys(re.findall(r"^diff --git a/(\S+) b/", text, re.M)))


def load_series(kind: str) -> dict[str, str]:
    """Patch name -> text, in application order, for this kind of tree."""
    series = {}
    for path in sorted(PATCH_DIR.glob("*.patch")):
        text = path.read_text()
        if kind == "installed" and not all(
            p.startswith("vllm/") for p in patch_paths(text)
        ):
            continue
        series[path.name] = text
    return series


def overlay_files(kind: str) -> dict[str, Path]:
    """Tree-relative path -> source file for every file the overlay lays."""
    files: dict[str, Path] = {}
    for src in sorted(OVERLAY_DIR.rglob("*")):
        rel = src.relative_to(OVERLAY_DIR).as_posix()
        if src.is_file() and "__pycache__" not in rel:
            files[rel] = src
    if kind == "source":
        for src in sorted((REPO / KERNEL_DIR).rglob("*")):
            if src.is_file():
                files[src.relative_to(REPO).as_posix()] = src
    else:
        files = {r: s for r, s in files.items() if r.startswith("vllm/")}
    return files


def run_git_apply(
    workdir: Path, patch_text: str, name: str, reverse: bool = False
) -> None:
    cmd = ["git", "apply", "--whitespace=nowarn"]
    if reverse:
        cmd.append("-R")
    # A scratch dir outside any repository makes `git apply` patch files
    # relative to it rather than to some enclosing work tree.
    out = subprocess.run(
        cmd,
        cwd=workdir,
        input=patch_text,
        text=True,
        capture_output=True,
        env=dict(os.environ, GIT_CEILING_DIRECTORIES=str(workdir.parent)),
    )
    if out.returncode != 0:
        verb = "reverse" if reverse else "apply"
        raise TreeError(f"patch {name} does not {verb} cleanly:\n{out.stderr}")


def patch_in_scratch(
    tree: Path, patches: list[tuple[str, str]], reverse: bool
) -> dict[str, bytes | None]:
    """Apply (or reverse) patches to scratch copies of the files they touch.

    Returns tree-relative path -> new content (None: the file goes away).
    Nothing in the tree is written here.
    """
    touched = list(dict.fromkeys(p for _, t in patches for p in patch_paths(t)))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "tree"
        work.mkdir()
        for rel in touched:
            if (tree / rel).is_file():
                (work / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(tree / rel, work / rel)
        for name, text in patches:
            run_git_apply(work, text, name, reverse=reverse)
        return {
            rel: (work / rel).read_bytes() if (work / rel).is_file() else None
            for rel in touched
        }


def write_files(tree: Path, contents: dict[str, bytes | None]) -> None:
    for rel, data in contents.items():
        dst = tree / rel
        if data is None or dst.is_symlink():
            dst.unlink(missing_ok=True)
        if data is not None:
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)


def read_manifest(tree: Path) -> dict | None:
    path = tree / MANIFEST_NAME
    return json.loads(path.read_text()) if path.is_file() else None


def apply(tree: Path) -> None:
    kind = tree_kind(tree)
    check_version(tree)
    series = load_series(kind)
    overlay = overlay_files(kind)
    manifest = read_manifest(tree)

    if manifest is not None and manifest["patches"] != series:
        # The series changed since it was laid: take the old one off first.
        print("the patch series changed since it was applied; re-applying")
        unapply(tree)
        manifest = None

    old_files: dict[str, str] = manifest["files"] if manifest else {}
    for rel, src in overlay.items():
        dst = tree / rel
        if (
            rel not in old_files
            and dst.exists()
            and dst.read_bytes() != src.read_bytes()
        ):
            raise TreeError(
                f"{dst} already exists in the tree; the overlay only adds new files"
            )
    for rel, digest in old_files.items():
        dst = tree / rel
        if (
            dst.is_file()
            and sha256_file(dst) != digest
            and rel in overlay
            and sha256_file(dst) != sha256_file(overlay[rel])
        ):
            raise TreeError(
                f"{dst} was edited in the tree since it was laid; run "
                f"`make patches` to copy it back into the overlay first"
            )

    writes: dict[str, bytes | None] = {}
    if manifest is None:
        writes.update(patch_in_scratch(tree, list(series.items()), reverse=False))
    for rel, src in overlay.items():
        data = src.read_bytes()
        dst = tree / rel
        if not dst.is_file() or dst.is_symlink() or dst.read_bytes() != data:
            writes[rel] = data
    for rel in old_files:
        if rel not in overlay:
            writes[rel] = None  # dropped from the overlay since the last apply

    if manifest is not None and not writes:
        print(f"QTIP series already applied to {tree}; nothing to do")
        return
    write_files(tree, writes)
    new_manifest = {
        "vllm": PINNED_VERSION,
        "kind": kind,
        "patches": series,
        "files": {rel: sha256_file(src) for rel, src in overlay.items()},
    }
    (tree / MANIFEST_NAME).write_text(json.dumps(new_manifest, indent=1) + "\n")
    if manifest is None:
        print(
            f"applied {len(series)} patches and {len(overlay)} overlay files "
            f"to the {kind} tree {tree}"
        )
    else:
        print(
            f"QTIP series already applied to {tree}; refreshed "
            f"{len(writes)} overlay files"
        )


def unapply(tree: Path) -> None:
    manifest = read_manifest(tree)
    if manifest is None:
        print(f"no QTIP series applied to {tree}; nothing to do")
        return
    patches = list(manifest["patches"].items())[::-1]
    writes = patch_in_scratch(tree, patches, reverse=True)
    for rel in manifest["files"]:
        writes[rel] = None
    write_files(tree, writes)
    # Remove directories the overlay created and left empty.
    for rel in sorted(manifest["files"], key=lambda r: -r.count("/")):
        parent = (tree / rel).parent
        while parent != tree and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
            parent = parent.parent
    (tree / MANIFEST_NAME).unlink()
    print(
        f"removed {len(patches)} patches and {len(manifest['files'])} overlay "
        f"files from {tree}"
    )


def status(tree: Path) -> None:
    manifest = read_manifest(tree)
    if manifest is None:
        print(f"{tree}: pristine (no QTIP series applied)")
        return
    print(
        f"{tree}: QTIP series applied ({manifest['kind']} tree), "
        f"{len(manifest['patches'])} patches, {len(manifest['files'])} files"
    )


# --------------------------------------------------------------------------
# Regenerating the series from an edited tree
# --------------------------------------------------------------------------


def pristine_files(tree: Path, cache: Path, paths: list[str]) -> dict[str, bytes]:
    """Pristine vLLM 0.26.0 content of the given files (absent ones left out),
    from the clone's HEAD or from the pinned sdist."""
    found: dict[str, bytes] = {}
    if (tree / ".git").exists():
        for rel in paths:
            out = subprocess.run(
                ["git", "-C", str(tree), "show", f"HEAD:{rel}"], capture_output=True
            )
            if out.returncode == 0:
                found[rel] = out.stdout
        return found
    archive = cache / SDIST_NAME
    if not archive.is_file():
        raise TreeError(
            f"need the pinned sdist {archive} to know the pristine "
            f"files; run `make fetch`"
        )
    with tarfile.open(archive) as tar:
        for rel in paths:
            try:
                member = tar.extractfile(f"vllm-{PINNED_VERSION}/{rel}")
            except KeyError:
                continue
            if member is not None:
                found[rel] = member.read()
    return found


def parse_header(text: str) -> tuple[str, str, str]:
    """(author, date, message) of a format-patch file."""
    author = re.search(r"^From: (.+)$", text, re.M).group(1)
    date = re.search(r"^Date: (.+)$", text, re.M).group(1)
    head = text.split("\n---\n", 1)[0]
    subject_block = head.split("Subject: ", 1)[1]
    subject, _, body = subject_block.partition("\n\n")
    subject = re.sub(r"^\[PATCH[^\]]*\]\s*", "", " ".join(subject.split()))
    return author, date, (subject + "\n\n" + body).strip() + "\n"


def regenerate(tree: Path, cache: Path) -> None:
    """Rewrite patches/ from the tree, and copy tree edits of overlay files back."""
    manifest = read_manifest(tree)
    if manifest is None or manifest["kind"] != "source":
        raise TreeError(f"{tree} has no QTIP series applied as a source tree")

    # Overlay files edited in the tree since they were laid go back to the repo.
    for rel, digest in manifest["files"].items():
        dst = tree / rel
        if dst.is_file() and sha256_file(dst) != digest:
            src = (
                REPO / rel
                if rel.startswith(KERNEL_DIR.as_posix())
                else OVERLAY_DIR / rel
            )
            shutil.copy2(dst, src)
            print(f"copied back {rel}")

    names = sorted(manifest["patches"])
    with tempfile.TemporaryDirectory() as tmp:
        git = ["git", "-C", tmp, "-c", "core.autocrlf=false"]
        subprocess.run([*git, "init", "-q"], check=True)
        all_paths = [p for n in names for p in patch_paths(manifest["patches"][n])]
        pristine = pristine_files(tree, cache, list(dict.fromkeys(all_paths)))
        for rel, data in pristine.items():
            (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
            (Path(tmp) / rel).write_bytes(data)
        base_env = dict(
            os.environ,
            GIT_AUTHOR_NAME="base",
            GIT_AUTHOR_EMAIL="base@x",
            GIT_COMMITTER_NAME="base",
            GIT_COMMITTER_EMAIL="base@x",
        )
        subprocess.run([*git, "add", "-A"], check=True)
        subprocess.run(
            [*git, "commit", "-q", "--allow-empty", "-m", "base"],
            check=True,
            env=base_env,
        )
        for name in names:
            text = manifest["patches"][name]
            author, date, message = parse_header(text)
            m = re.match(r"(.*) <(.*)>", author)
            env = dict(
                os.environ,
                GIT_AUTHOR_NAME=m.group(1),
                GIT_AUTHOR_EMAIL=m.group(2),
                GIT_COMMITTER_NAME=m.group(1),
                GIT_COMMITTER_EMAIL=m.group(2),
                GIT_AUTHOR_DATE=date,
                GIT_COMMITTER_DATE=date,
            )
            for rel in patch_paths(text):
                dst = Path(tmp) / rel
                if (tree / rel).is_file():
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(tree / rel, dst)
                else:
                    dst.unlink(missing_ok=True)
                subprocess.run([*git, "add", "-A", "--", rel], check=True)
            subprocess.run(
                [*git, "commit", "-q", "--allow-empty", "-F", "-"],
                input=message,
                text=True,
                check=True,
                env=env,
            )
        out_dir = Path(tmp) / "out"
        subprocess.run(
            [
                *git,
                "format-patch",
                "-q",
                "--no-signature",
                "--zero-commit",
                "-o",
                str(out_dir),
                f"HEAD~{len(names)}",
            ],
            check=True,
        )
        new = sorted(out_dir.glob("*.patch"))
        changed = 0
        for old_name, path in zip(names, new):
            text = path.read_text()
            if old_name != path.name:
                (PATCH_DIR / old_name).unlink()
            target = PATCH_DIR / path.name
            if not target.is_file() or target.read_text() != text:
                target.write_text(text)
                changed += 1
    print(f"regenerated {len(names)} patches in {PATCH_DIR} ({changed} changed)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "command", choices=["fetch", "apply", "unapply", "status", "patches"]
    )
    parser.add_argument(
        "--tree", type=Path, help="vLLM tree (default: the pinned sdist)"
    )
    parser.add_argument("--build-dir", type=Path, default=REPO / "build")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("QTIP_CACHE_DIR", REPO / "build" / "cache")),
    )
    parser.add_argument(
        "--python", default=sys.executable, help="python whose pip downloads the sdist"
    )
    args = parser.parse_args(argv)
    tree = args.tree or args.build_dir / f"vllm-{PINNED_VERSION}"
    try:
        if args.command == "fetch":
            fetch(args.build_dir, args.cache, args.python)
        elif args.command == "apply":
            apply(tree.resolve())
        elif args.command == "unapply":
            unapply(tree.resolve())
        elif args.command == "status":
            status(tree.resolve())
        else:
            regenerate(tree.resolve(), args.cache)
    except TreeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
