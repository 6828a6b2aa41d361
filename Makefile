# Development and CI entry points. Everything runs against a pinned real ComfyUI (see scripts/setup.sh);
# COMFYUI_PATH=/path/to/ComfyUI uses an existing one instead.
PY := .venv/bin/python
PORT ?= 8188

.PHONY: setup test test-fast serve demo bench parity clean

setup:
	@bash scripts/setup.sh

test: setup
	$(PY) -m pytest tests -q -p no:cacheprovider

# Pure maths only: no ComfyUI start, no subprocesses (torchrun, fresh interpreters).
test-fast: setup
	$(PY) -m pytest tests -q -p no:cacheprovider --ignore=tests/host --ignore=tests/e2e --ignore=tests/browser -m "not subprocess"

serve: setup
	@bash scripts/serve.sh $(PORT)

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) bench/sampler_overhead.py
	$(PY) scripts/parity_report.py
	$(PY) bench/lora_load.py
	$(PY) -m pip install --isolated -q -r requirements-bench.txt
	$(PY) bench/distill_fidelity.py
	$(PY) bench/distill_step.py

parity: setup
	$(PY) scripts/parity_report.py

clean:
	rm -rf demo_out bench_out .serve
