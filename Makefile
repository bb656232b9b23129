# Two entry points (see README): `make demo` runs the main job, `make test` the whole suite.
# Both set up .venv from nothing first. On this project's CPU machines torch is pinned to the CPU
# build that lies on disk; on a GPU machine override it, e.g. `make test TORCH_SPEC=torch`.
PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN        := $(VENV)/bin

.PHONY: setup demo test bench lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	@echo "moss_kernels: installing in place; this compiles the native C++ extension (about 2 min on 2 idle cores, more under load). MOSS_KERNELS_NATIVE=0 skips it (the reference backend runs); make ... VERBOSE=1 shows the compiler's lines."
	$(BIN)/python -m pip install $(if $(VERBOSE),-v,) --no-build-isolation -e .
	touch $@

demo: setup
	$(BIN)/python -m moss_kernels.demo

test: setup
	$(BIN)/python -m pytest tests benchmarks -q -rs -p no:cacheprovider --benchmark-disable

bench: setup
	$(BIN)/python -m moss_kernels.bench --quick

lint: setup
	$(BIN)/ruff check moss_kernels triton_kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
