# The two commands a new machine needs (see README.md).
.PHONY: install serve test bench-kernel bench-preprocess bench-serve

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
