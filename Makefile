# qtip-vllm: the QTIP quantization method as a patch series on vLLM 0.26.0.
#
#   make apply && make build   lay the series onto the pinned sdist (or
#                              VLLM_DIR=<clone or site-packages>) and build
#   make test                  run the test suite (CPU; GPU tests skip)
#
#   make lint                  vLLM's own pre-commit checks on the series
#   make pr VLLM_DIR=<clone>   the series as a PR branch of a vLLM v0.26.0 clone
#
# Other targets: venv, fetch, unapply, status, patches, build-ext, format,
# lint-venv, clean.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
VPY := $(abspath $(VENV))/bin/python
BUILD_DIR := $(abspath build)
DEFAULT_TREE := $(BUILD_DIR)/vllm-0.26.0
VLLM_DIR ?= $(DEFAULT_TREE)
TREE := $(abspath $(VLLM_DIR))
# CMake helpers and csrc headers: the tree itself, or the pinned sdist when
# the tree is an installed package.
VLLM_SOURCE_DIR ?= $(if $(wildcard $(TREE)/CMakeLists.txt),$(TREE),$(DEFAULT_TREE))
# _qtip_C is built for TORCH_CUDA_ARCH_LIST when set, else for the GPU present,
# else (no GPU) for the release list; `make build-release` always takes that.
QTIP_RELEASE_ARCHS := 8.0 8.6 8.9 9.0
export QTIP_RELEASE_ARCHS
# Downloads (the pinned sdist and wheel) are kept here; CI points it outside
# the clone so they survive between runs.
export QTIP_CACHE_DIR ?= $(BUILD_DIR)/cache
TREE_TOOL := $(PYTHON) scripts/vllm_tree.py --tree $(TREE) --build-dir $(BUILD_DIR) --cache $(QTIP_CACHE_DIR)
WHEEL := $(QTIP_CACHE_DIR)/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
WHEEL_SHA256 := adb1e4c9b46d0dfdb094121ae5aad670a42412dd813ed4e5db069ed6a15006de
# pytest exits 5 when it collects nothing (e.g. a filtered run); that is not a failure.
PYTEST := $(VPY) -m pytest -q -p no:cacheprovider

# QTIP tests laid into the tree, plus vLLM's own quantization tests that run
# on a CPU machine, to show the series breaks nothing there.
QTIP_TREE_TESTS := tests/quantization/test_qtip.py \
	tests/quantization/test_qtip_detection.py \
	tests/quantization/test_qtip_config.py \
	tests/quantization/test_qtip_reference.py \
	tests/kernels/quantization/test_qtip.py \
	tests/kernels/quantization/test_qtip_fake.py \
	tests/models/quantization/test_qtip.py \
	tests/models/quantization/test_qtip_parallel.py
VLLM_CPU_TESTS := tests/quantization/test_register_quantization_config.py::test_register_quantization_config \
	tests/quantization/test_humming_ignore.py \
	tests/quantization/test_quantization_config_args.py

# vLLM 0.26.0's pre-commit tools, in their own environment.
LINT_VENV ?= .venv-lint
LPY := $(abspath $(LINT_VENV))/bin/python
MARKDOWNLINT := $(abspath $(LINT_VENV))/node/node_modules/.bin/markdownlint-cli2
MARKDOWNLINT_VERSION := 0.21.0

.PHONY: venv fetch apply unapply status patches build build-ext build-release test test-repo test-tree lint lint-venv format pr clean

venv: $(VENV)/.installed
$(VENV)/.installed: requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -r requirements.txt
	$(if $(wildcard scripts/requirements-quant.txt),$(VPY) -m pip install -r scripts/requirements-quant.txt)
	touch $@

fetch: venv
	@if [ "$(TREE)" = "$(DEFAULT_TREE)" ] || [ "$(VLLM_SOURCE_DIR)" = "$(DEFAULT_TREE)" ]; then \
		$(TREE_TOOL) --python $(VPY) fetch; fi

apply: fetch
	$(TREE_TOOL) apply

unapply:
	$(TREE_TOOL) unapply

status:
	$(TREE_TOOL) status

patches:
	$(TREE_TOOL) patches

# Install the applied source tree editable, from the pinned wheel's binaries
# (no vLLM compile), then build _qtip_C. An installed package (site-packages)
# only gets _qtip_C.
build: venv
	@test -f $(TREE)/.qtip_vllm_applied.json || { echo "error: run 'make apply' first" >&2; exit 1; }
	@if [ -f $(TREE)/setup.py ] && [ "$$($(VPY) -c 'import vllm,os;print(os.path.dirname(os.path.dirname(vllm.__file__)))' 2>/dev/null)" != "$(TREE)" ]; then \
		set -e; \
		test -f $(WHEEL) || $(VPY) -m pip download -q --no-deps vllm==0.26.0 -d $(QTIP_CACHE_DIR); \
		echo "$(WHEEL_SHA256)  $(WHEEL)" | sha256sum -c --quiet; \
		VLLM_PRECOMPILED_WHEEL_LOCATION=$(WHEEL) \
			$(VPY) -m pip install -q --no-index --no-deps --no-build-isolation -e $(TREE); \
	fi
	$(MAKE) build-ext

build-ext:
	PATH=$(abspath $(VENV))/bin:$$PATH scripts/build_qtip_ext.sh $(VPY) $(VLLM_SOURCE_DIR) $(TREE) $(BUILD_DIR)/qtip-ext

# Every release architecture, whatever GPU this machine has.
build-release:
	$(MAKE) build TORCH_CUDA_ARCH_LIST="$(QTIP_RELEASE_ARCHS)"

test: test-repo test-tree

test-repo:
	$(PYTEST) tests || [ $$? -eq 5 ]

test-tree:
	cd $(TREE) && { $(PYTEST) $(QTIP_TREE_TESTS) $(VLLM_CPU_TESTS) || [ $$? -eq 5 ]; }

lint-venv: $(LINT_VENV)/.installed
$(LINT_VENV)/.installed: requirements-lint.txt
	test -x $(LPY) || $(PYTHON) -m venv $(LINT_VENV)
	$(LPY) -m pip install -q -r requirements-lint.txt
	@if command -v npm >/dev/null; then \
		npm install --prefix $(LINT_VENV)/node --no-audit --no-fund --silent \
			markdownlint-cli2@$(MARKDOWNLINT_VERSION); \
	else echo "npm not found: make lint will skip markdownlint"; fi
	touch $@

# ruff, mypy, typos, clang-format, markdownlint and vLLM's own hooks, run on
# the series' files in the applied tree with the tree's configs (refreshing
# the laid files first); ruff also on our scripts/ and tests/.
lint: lint-venv
	@test -f $(TREE)/.qtip_vllm_applied.json || { \
		echo "error: run 'make apply' first: lint checks the series in the applied tree" >&2; exit 1; }
	$(TREE_TOOL) apply
	$(LPY) scripts/lint.py --tree $(TREE) --venv $(LINT_VENV) \
		$$(test -x $(MARKDOWNLINT) && echo --markdownlint $(MARKDOWNLINT))

# Rewrite our files the way the linters want them: ruff check --fix and ruff
# format (vllm_overlay, scripts, tests), clang-format -i with vLLM's
# .clang-format (csrc/libtorch_stable/quantization/qtip).
format: lint-venv
	$(LPY) scripts/lint.py --tree $(VLLM_SOURCE_DIR) --venv $(LINT_VENV) --format

# The pull-request branch (PR_BRANCH, default qtip; PR_FORCE=1 replaces it)
# in a vLLM v0.26.0 git clone, as vLLM-style signed-off commits whose tree is
# what `make apply` lays there; the pull request's text is PR_DESCRIPTION.md.
pr:
	@[ "$(TREE)" != "$(DEFAULT_TREE)" ] || { \
		echo "usage: make pr VLLM_DIR=<a vLLM v0.26.0 git clone>" >&2; exit 1; }
	$(PYTHON) scripts/make_pr.py --vllm-dir $(TREE) --branch $(or $(PR_BRANCH),qtip) \
		$(if $(PR_FORCE),--force)

clean:
	rm -rf $(BUILD_DIR)/qtip-ext
