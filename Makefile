# The two commands a new machine needs (see README.md), the benchmarks, and the GPU check.
.PHONY: install serve test bench-kernel bench-preprocess bench-serve gpu-check

install:
	bash scripts/install.sh

serve: install
	.venv/bin/python server.py $(ARGS)

test: install
	.venv/bin/python -m pytest $(PYTEST_ARGS)

bench-kernel: install
	.venv/bin/python -m benchmarks.visual_embed $(ARGS)

bench-preprocess: install
	.venv/bin/python -m benchmarks.preprocess $(ARGS)

bench-serve: install
	.venv/bin/python -m benchmarks.serve $(ARGS)

# CUDA machines only: installs the CUDA build, runs the CUDA tests and the GPU benchmarks, and
# appends a dated section to benchmarks/RESULTS.md (benchmarks/gpu_check.py). Without CUDA it
# stops at once, installing nothing. Not yet run on a GPU: it was written without one.
gpu-check:
	python3 -m benchmarks.gpu_check $(ARGS)
