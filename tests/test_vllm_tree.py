# SPDX-License-Identifier: Apache-2.0
"""The apply / unapply / regenerate logic of scripts/vllm_tree.py, run on
fresh copies of the pinned vLLM 0.26.0 sdist."""

import filecmp
import importlib.util
import os
import shutil
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location(
    "vllm_tree", REPO / "scripts" / "vllm_tree.py"
)
vllm_tree = importlib.util.module_from_spec(spec)
spec.loader.exec_module(vllm_tree)

# The Makefile (and CI) keep the pinned sdist in QTIP_CACHE_DIR.
SDIST = (
    Path(os.environ.get("QTIP_CACHE_DIR", REPO / "build" / "cache"))
    / vllm_tree.SDIST_NAME
)
pytestmark = pytest.mark.skipif(
    not SDIST.is_file(), reason=f"{SDIST} missing: run `make fetch` first"
)

QUANT_INIT = "vllm/model_executor/layers/quantization/__init__.py"
CONFIG_PY = "vllm/transformers_utils/config.py"
QTIP_PY = "vllm/model_executor/layers/quantization/qtip.py"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    with tarfile.open(SDIST) as tar:
        tar.extractall(root, filter="data")
    return root / "vllm-0.26.0"


@pytest.fixture
def tree(pristine, tmp_path) -> Path:
    dst = tmp_path / "vllm-0.26.0"
    shutil.copytree(pristine, dst, symlinks=True)
    return dst


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def diff_trees(a: Path, b: Path) -> list[str]:
    """Relative paths that differ between two trees (added, removed, changed)."""
    sa, sb = snapshot(a), snapshot(b)
    return sorted(k for k in sa.keys() | sb.keys() if sa.get(k) != sb.get(k))


def test_apply_lays_overlay_and_patches(tree):
    vllm_tree.apply(tree)
    init = (tree / QUANT_INIT).read_text()
    assert '    "qtip",\n' in init
    assert '"qtip": QTIPConfig' in init
    assert "quip_params" in (tree / CONFIG_PY).read_text()
    assert "cmake/qtip.cmake" in (tree / "CMakeLists.txt").read_text()
    # The kernels join _C_stable_libtorch: no extension of their own.
    assert "_qtip_C" not in (tree / "setup.py").read_text()
    for rel, src in vllm_tree.overlay_files("source").items():
        assert (tree / rel).read_bytes() == src.read_bytes(), rel
    assert (tree / QTIP_PY).is_file()
    assert any((tree / "csrc/libtorch_stable/quantization/qtip").iterdir())


def test_apply_twice_is_a_noop(tree, capsys):
    vllm_tree.apply(tree)
    before = snapshot(tree)
    capsys.readouterr()
    vllm_tree.apply(tree)
    assert "nothing to do" in capsys.readouterr().out
    assert snapshot(tree) == before


def test_unapply_restores_pristine_tree(tree, pristine):
    vllm_tree.apply(tree)
    assert diff_trees(tree, pristine)
    vllm_tree.unapply(tree)
    assert diff_trees(tree, pristine) == []


def test_failing_patch_writes_nothing(tree, tmp_path, monkeypatch):
    patch_dir = tmp_path / "patches"
    shutil.copytree(vllm_tree.PATCH_DIR, patch_dir)
    # A last patch whose context is not in the tree.
    bad = (patch_dir / sorted(p.name for p in patch_dir.glob("*.patch"))[0]).read_text()
    bad = bad.replace(
        "QuantizationMethods = Literal[", "QuantizationMethodz = Literal["
    )
    (patch_dir / "9999-broken.patch").write_text(bad)
    monkeypatch.setattr(vllm_tree, "PATCH_DIR", patch_dir)
    before = snapshot(tree)
    with pytest.raises(vllm_tree.TreeError, match="9999-broken.patch"):
        vllm_tree.apply(tree)
    assert snapshot(tree) == before


def test_refuses_other_vllm_version(tree):
    pkg_info = tree / "PKG-INFO"
    pkg_info.write_text(
        pkg_info.read_text().replace("Version: 0.26.0", "Version: 0.25.1")
    )
    with pytest.raises(vllm_tree.TreeError, match=r"vLLM 0\.25\.1.*0\.26\.0"):
        vllm_tree.apply(tree)
    assert not (tree / vllm_tree.MANIFEST_NAME).exists()


def test_installed_package_gets_python_part_only(pristine, tmp_path):
    site = tmp_path / "site-packages"
    shutil.copytree(pristine / "vllm", site / "vllm", symlinks=True)
    dist = site / "vllm-0.26.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm\nVersion: 0.26.0\n"
    )
    vllm_tree.apply(site)
    assert (site / QTIP_PY).is_file()
    assert '"qtip": QTIPConfig' in (site / QUANT_INIT).read_text()
    manifest = vllm_tree.read_manifest(site)
    assert manifest["kind"] == "installed"
    assert all(rel.startswith("vllm/") for rel in manifest["files"])
    assert not (site / "tests").exists() and not (site / "csrc").exists()
    vllm_tree.unapply(site)
    assert diff_trees(site / "vllm", pristine / "vllm") == []


def test_regenerated_patches_equal_the_series(tree, tmp_path, monkeypatch):
    patch_dir = tmp_path / "patches"
    shutil.copytree(vllm_tree.PATCH_DIR, patch_dir)
    monkeypatch.setattr(vllm_tree, "PATCH_DIR", patch_dir)
    vllm_tree.apply(tree)
    vllm_tree.regenerate(tree, SDIST.parent)
    _, mismatch, errors = filecmp.cmpfiles(
        patch_dir,
        REPO / "patches",
        [p.name for p in (REPO / "patches").glob("*.patch")],
        shallow=False,
    )
    assert mismatch == [] and errors == []


def test_regenerate_picks_up_tree_edits(tree, tmp_path, monkeypatch):
    patch_dir = tmp_path / "patches"
    shutil.copytree(vllm_tree.PATCH_DIR, patch_dir)
    monkeypatch.setattr(vllm_tree, "PATCH_DIR", patch_dir)
    vllm_tree.apply(tree)
    cfg = tree / CONFIG_PY
    cfg.write_text(
        cfg.read_text().replace(
            "# QTIP checkpoints may declare", "# QTIP checkpoints can declare"
        )
    )
    vllm_tree.regenerate(tree, SDIST.parent)
    texts = "".join(p.read_text() for p in patch_dir.glob("*.patch"))
    assert "+    # QTIP checkpoints can declare" in texts
