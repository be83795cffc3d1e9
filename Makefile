# Two commands set up everything on a fresh machine:
#   make train   - the main job: train the default MoE LM on the CPU (embedded data, about a minute)
#   make test    - the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# A CPU machine installs torch 2.13.0 from the wheel on disk; a plain `torch` would download a CUDA build.
# Without that wheel: make setup TORCH_PIN="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
TORCH_PIN ?= torch==2.13.0
# Triton for its CPU interpreter: the tests run the project's Triton kernels on the CPU (GPUs compile them).
TRITON_PIN ?= triton==3.8.0

.PHONY: train test setup clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH_PIN)
	$(PY) -m pip install -q --disable-pip-version-check $(TRITON_PIN)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,hf,plot,serve,vision]'
	touch $@

setup: $(VENV)/.installed

train: setup
	$(VENV)/bin/moestack train --device cpu $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
