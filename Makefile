.PHONY: demo test lint perf

demo:
	bash deploy/quickstart.sh demo

test:
	bash deploy/quickstart.sh test

lint:
	.venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy

perf:
	.venv/bin/python -m perf
