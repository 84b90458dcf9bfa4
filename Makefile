# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# TORCH_SPEC is what pip installs for torch before the project. The default is the CPU build; on a GPU cluster
# install your CUDA torch yourself and run `make TORCH_SPEC= test` (an empty spec keeps the torch you have,
# e.g. with VENV_FLAGS=--system-site-packages: the project is then installed by pip, which sees the system's packages,
# where uv would not and would put PyPI's torch over yours), or pass the pip requirement of the build you want.
# The default finds the CPU wheel through pip's find-links on these machines; elsewhere PyPI's torch for Linux is
# the CUDA build: add PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu for the CPU one (2.13.0+cpu).
PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# uv resolves and installs the ~130 dependencies in ~30 s where pip takes ~4 min (sdists built serially); torch
# itself goes through pip, which is what finds a local torch wheel (pip's find-links) and keeps its CUDA build.
UV := $(VENV)/bin/uv
# uv writes no bytecode unless asked (pip does): where PYTHONDONTWRITEBYTECODE is set, as on these machines, every
# process would then compile deepspeed, transformers, datasets... from source again, ~2.6 s of each import of the
# trainer on 2 cores, paid by every rank, launcher and tool of every run. Compiled once at install instead (~30 s).
UV_INSTALL := $(UV) pip install -q --compile-bytecode --python $(PY)

.PHONY: setup llama-cpp bytecode test test-floors test-fast demo demo-crosstok demo-generate bench lint clean

# Two jobs: the project's install and llama.cpp's build run side by side (the install waits on the network much of
# its ~50 s; the build is ~75 s of compiling on 2 cores), ~15 s less of `make test`'s set-up than one after the
# other (120 s against 135 from a fresh clone).
MAKEFLAGS += -j2

setup: $(VENV)/.installed

# The venv alone (with pip): what the install and the llama.cpp build both start from.
$(PY):
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	if [ -n "$(TORCH_SPEC)" ]; then $(PIP) install -q "$(TORCH_SPEC)"; fi
	$(PIP) install -q "uv>=0.5,<1"
	$(if $(TORCH_SPEC),$(UV_INSTALL),$(PIP) install -q) -e ".[$(EXTRAS)]"
	touch $@

# llama.cpp, to run and verify GGUF exports: llama-cpp-python's sdist (it vendors llama.cpp) built into a wheel once
# per CPU (ggml is compiled with -march=native, so the wheel is keyed by the CPU's flags and another CPU rebuilds it),
# only the library: no tools, server, multimodal or `common`. ~2 min on 2 cores. The extracted sdist stays too: its
# convert_hf_to_gguf.py is what tests/test_gguf.py compares the export against.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CPP_CACHE ?= .cache/llama-cpp
LLAMA_CPP_SRC := $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION)
CPU_KEY := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | md5sum | cut -c1-12)
LLAMA_CPP_WHEELS := $(LLAMA_CPP_CACHE)/wheel-$(LLAMA_CPP_VERSION)-$(CPU_KEY)
LLAMA_CPP_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF \
	-DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON

llama-cpp: $(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-$(CPU_KEY)

# The bindings load only libllama and libggml: the first sed skips llama.cpp's `common` (half the build), which the
# package's CMakeLists forces on. The second builds libllama (model graphs, loading, vocab, sampling: no kernels,
# those are ggml's and stay -O3) at -O1; the third unity-builds its core files too (upstream batches only the model
# files): each core file re-parses the same heavy headers, most of the compile. libllama then takes 75 s of CPU
# instead of 143 (the build 77 s instead of 119 on the Xeon VM).
$(LLAMA_CPP_SRC)/PKG-INFO: | $(PY)
	mkdir -p $(LLAMA_CPP_CACHE)
	$(PIP) download -q --no-deps --no-binary :all: -d $(LLAMA_CPP_CACHE) "llama-cpp-python==$(LLAMA_CPP_VERSION)"
	tar -xzf $(LLAMA_CPP_CACHE)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_CPP_CACHE)
	sed -i 's/^    set(LLAMA_BUILD_COMMON ON CACHE BOOL/    set(LLAMA_BUILD_COMMON OFF CACHE BOOL/' $(LLAMA_CPP_SRC)/CMakeLists.txt
	sed -i 's/^target_compile_features *(llama PRIVATE cxx_std_17).*/&\ntarget_compile_options(llama PRIVATE -O1)/' \
		$(LLAMA_CPP_SRC)/vendor/llama.cpp/src/CMakeLists.txt
	grep -q 'llama PRIVATE -O1' $(LLAMA_CPP_SRC)/vendor/llama.cpp/src/CMakeLists.txt
	sed -i '/^set_source_files_properties(\$${LLAMA_CORE_SOURCES}/,/SKIP_UNITY_BUILD_INCLUSION ON)/d' \
		$(LLAMA_CPP_SRC)/vendor/llama.cpp/src/CMakeLists.txt
	! grep -q SKIP_UNITY_BUILD_INCLUSION $(LLAMA_CPP_SRC)/vendor/llama.cpp/src/CMakeLists.txt
	touch $@

# The wheel needs only the venv's pip (it builds in an isolated environment), not the project: it builds while
# setup installs.
$(LLAMA_CPP_WHEELS)/.built: $(LLAMA_CPP_SRC)/PKG-INFO | $(PY)
	ls $(LLAMA_CPP_WHEELS)/*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" \
		CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(PIP) wheel -q --no-deps --no-cache-dir -w $(LLAMA_CPP_WHEELS) $(LLAMA_CPP_SRC)
	touch $@

$(VENV)/.llama-cpp-$(LLAMA_CPP_VERSION)-$(CPU_KEY): $(VENV)/.installed $(LLAMA_CPP_WHEELS)/.built
	$(UV_INSTALL) --reinstall-package llama-cpp-python $(LLAMA_CPP_WHEELS)/*.whl
	rm -f $(VENV)/.llama-cpp-*
	touch $@

# The project's own modules compiled for the same reason as UV_INSTALL's flag (an editable install is not in
# site-packages); a file changed since is recompiled, in memory, by Python as usual.
bytecode: setup
	$(PY) -m compileall -q megadistil launch tools tests bench

# Two pytest workers, a test file each (module fixtures stay in one process): a multi-rank test spends much of its
# time in imports and rendezvous, so a second file fills the idle core (854 tests: 7.2 min on the 2-core AMX Xeon VM,
# 8.4 on it slowed to an AVX2-only EPYC's GEMM speeds; README: "make test").
# Files go out in collection order, longest first (tests/conftest.py): xdist's default reorders them by test count,
# which left the quick demo to run last and alone.
TEST_WORKERS ?= 2

test: setup llama-cpp bytecode
	$(PY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# The same suite with every direct dependency at the lower bound of its range in pyproject.toml (uv's lowest-direct
# resolution), in a venv of its own: what keeps the ranges honest. Not part of `make test`. torch goes through pip, so
# its floor is spelled here; 2.11 comes from PyPI (its CUDA build, which runs on CPU too).
test-floors:
	$(MAKE) VENV=.venv-floors TORCH_SPEC=torch==2.11.0 UV_RESOLUTION=lowest-direct test

test-fast: setup bytecode
	$(PY) -m pytest -q -ra -m "not multirank"

demo: setup llama-cpp bytecode
	$(PY) -m megadistil.demo --out runs/demo $(DEMO_ARGS)

# The demo's student distilled from a teacher with another tokenizer (CE + ULD), against the same-tokenizer and
# CE-only students: runs/demo-crosstok/report.md
demo-crosstok: setup bytecode
	$(PY) -m megadistil.demo_crosstok --out runs/demo-crosstok $(DEMO_ARGS)

# Generate, then distil: a student on teacher-generated text and an on-policy student, beside the shared-teacher one:
# runs/demo-generate/report.md
demo-generate: setup bytecode
	$(PY) -m megadistil.demo_generate --out runs/demo-generate $(DEMO_ARGS)

bench: setup llama-cpp bytecode
	for f in bitlinear shards losses distill_step inference; do echo "== bench/$$f.py"; $(PY) bench/$$f.py || exit 1; done
	$(PY) bench/report.py

lint: setup
	$(PY) -m ruff check megadistil launch tools bench tests

# runs/ is not build output: every shipped config's train.output_dir (checkpoints) is under it. `rm -rf runs/demo`
# for the demo's.
clean:
	rm -rf $(VENV) .venv-floors build *.egg-info .pytest_cache .cache
