# SPDX-License-Identifier: Apache-2.0
"""`make pr`: the series as a branch of a vLLM v0.26.0 git clone.

The clone is a small git repository made here from the pinned sdist (the
files the series touches and what marks a vLLM source tree), tagged v0.26.0;
no network. The branch must hold the series as vLLM-style commits and have
exactly the tree that `make apply` lays on the same clone.
"""

import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
import make_pr  # noqa: E402

vllm_tree = make_pr.vllm_tree

SDIST = (
    Path(os.environ.get("QTIP_CACHE_DIR", REPO / "build" / "cache"))
    / vllm_tree.SDIST_NAME
)
pytestmark = pytest.mark.skipif(
    not SDIST.is_file(), reason=f"{SDIST} missing: run `make fetch` first"
)
USER = ("Jane Doe", "jane@example.com")


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def origin(tmp_path_factory) -> Path:
    """A tiny vLLM v0.26.0 repository: the sdist files the series patches."""
    root = tmp_path_factory.mktemp("origin") / "vllm"
    touched = {
        rel
        for text in vllm_tree.load_series("source").values()
        for rel in vllm_tree.patch_paths(text)
    }
    wanted = touched | {"vllm/__init__.py", "setup.py", "CMakeLists.txt"}
    prefix = f"vllm-{vllm_tree.PINNED_VERSION}/"
    with tarfile.open(SDIST) as tar:
        members = [m for m in tar.getmembers() if m.name.removeprefix(prefix) in wanted]
        assert len(members) == len(wanted), wanted - {
            m.name.removeprefix(prefix) for m in members
        }
        tar.extractall(root.parent, members=members, filter="data")
    (root.parent / prefix).rename(root)
    git(root.parent, "init", "-q", str(root))
    git(root, "config", "user.name", "vLLM")
    git(root, "config", "user.email", "vllm@example.com")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "vLLM 0.26.0")
    git(root, "tag", "v0.26.0")
    return root


def clone(origin: Path, dst: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(origin), str(dst)], check=True)
    git(dst, "config", "user.name", USER[0])
    git(dst, "config", "user.email", USER[1])
    return dst


def test_branch_holds_the_series_as_vllm_commits(origin, tmp_path):
    repo = clone(origin, tmp_path / "pr")
    head = git(repo, "rev-parse", "HEAD")
    assert make_pr.main(["--vllm-dir", str(repo)]) == 0

    titles = git(repo, "log", "--reverse", "--format=%s", "v0.26.0..qtip").splitlines()
    assert titles == [c.title for c in make_pr.COMMITS]
    assert all(t.split("]")[0] in ("[Quantization", "[Kernel", "[Doc") for t in titles)
    for commit in git(repo, "rev-list", "v0.26.0..qtip").split():
        message = git(repo, "log", "-1", "--format=%B", commit)
        assert message.rstrip().endswith(f"Signed-off-by: {USER[0]} <{USER[1]}>")
        assert f"Co-authored-by: {make_pr.DEFAULT_CO_AUTHOR}" in message
        assert git(repo, "log", "-1", "--format=%an <%ae>", commit) == (
            f"{USER[0]} <{USER[1]}>"
        )
    # The clone's checkout is left alone.
    assert git(repo, "rev-parse", "HEAD") == head
    assert git(repo, "status", "--porcelain") == ""

    # The branch's tree is what `make apply` lays on the same clone.
    applied = clone(origin, tmp_path / "applied")
    vllm_tree.apply(applied)
    git(applied, "add", "-A")
    git(applied, "rm", "-q", "--cached", vllm_tree.MANIFEST_NAME)
    assert git(applied, "write-tree") == git(repo, "rev-parse", "qtip^{tree}")

    # Mailed as patches, the series applies with `git am` to another clone.
    patches = tmp_path / "mail"
    git(repo, "format-patch", "-q", "-k", "-o", str(patches), "v0.26.0..qtip")
    mailed = clone(origin, tmp_path / "mailed")
    git(mailed, "am", "-q", "-k", *sorted(str(p) for p in patches.iterdir()))
    assert git(mailed, "rev-parse", "HEAD^{tree}") == git(
        repo, "rev-parse", "qtip^{tree}"
    )
    assert git(mailed, "log", "--reverse", "--format=%s", "v0.26.0..HEAD") == (
        "\n".join(titles)
    )


def test_existing_branch_needs_force(origin, tmp_path, capsys):
    repo = clone(origin, tmp_path / "pr")
    assert make_pr.main(["--vllm-dir", str(repo)]) == 0
    first = git(repo, "rev-parse", "qtip")
    assert make_pr.main(["--vllm-dir", str(repo)]) == 1
    assert "use --force" in capsys.readouterr().err
    assert make_pr.main(["--vllm-dir", str(repo), "--force", "--co-author", ""]) == 0
    assert git(repo, "rev-parse", "qtip^{tree}") == git(
        repo, "rev-parse", f"{first}^{{tree}}"
    )
    assert "Co-authored-by" not in git(repo, "log", "-1", "--format=%B", "qtip")


def test_refuses_a_clone_without_the_release_tag_or_identity(
    origin, tmp_path, capsys, monkeypatch
):
    repo = clone(origin, tmp_path / "pr")
    git(repo, "tag", "-d", "v0.26.0")
    assert make_pr.main(["--vllm-dir", str(repo)]) == 1
    assert "no v0.26.0 tag" in capsys.readouterr().err

    repo = clone(origin, tmp_path / "anon")
    git(repo, "config", "--unset", "user.name")
    # No identity from the user's or the system's git config either.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", os.devnull)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    assert make_pr.main(["--vllm-dir", str(repo)]) == 1
    assert "Signed-off-by" in capsys.readouterr().err


def test_every_series_file_has_a_commit():
    groups = make_pr.assign_files(sorted(vllm_tree.overlay_files("source")))
    assert all(groups), "a commit without files"
    with pytest.raises(make_pr.PRError, match="FILE_RULES"):
        make_pr.assign_files(["rust/src/lib.rs"])
