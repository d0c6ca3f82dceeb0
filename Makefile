# One command each (GNU make): `make demo` installs the toolkit and trains an offline preset end to end;
# `make test` installs what the tests need, lints, type-checks and runs them, as CI does (.ci/run).
.PHONY: demo test

demo:
	pip install torch==2.13.0
	pip install .
	finetune run spam --config spam_tiny

test:
	pip install torch==2.13.0
	pip install -e ".[dev]"
	pip install --no-deps llms-from-scratch==1.0.19
	ruff check finetune recipes evals
	ruff format --check finetune recipes evals
	mypy
	mkdocs build --strict --site-dir "$${TMPDIR:-/tmp}/finetune-site"
	python -m pytest -q
