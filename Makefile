# Two commands on a fresh machine (torch is installed first when missing, then the pinned tools and
# models, then the extension is built in place); both are quick to re-run once installed.
#   make demo   the main job: a 4-round chat with SmolLM2, KV cache kept across rounds, TTFT table
#   make test   the test suite
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0
STAMP := .stamp-install
BUILD_INPUTS := $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh') \
                setup.py pyproject.toml requirements.txt requirements-nodeps.txt

.PHONY: demo test install lint cuda-check bench clean

$(STAMP): $(BUILD_INPUTS)
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==$(TORCH_VERSION)"
	$(PYTHON) -m pip install -r requirements.txt
	$(PYTHON) -m pip install --no-deps -r requirements-nodeps.txt
	MAX_JOBS=$${MAX_JOBS:-4} $(PYTHON) -m pip install --no-build-isolation -e .
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(PYTHON) -m ism_ext demo

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

lint: $(STAMP)
	$(PYTHON) -m ruff check .

# nvcc compile check of every .cu file for sm_80 and sm_90a, with the -Xptxas -v report (no GPU needed).
cuda-check:
	cmake -S . -B build/cuda-check -DISM_WITH_TORCH=OFF >/dev/null
	cmake --build build/cuda-check --target cuda_compile_check

bench: $(STAMP)
	$(PYTHON) -m ism_ext bench

clean:
	rm -rf build $(STAMP) ism_ext/_C*.so *.egg-info
