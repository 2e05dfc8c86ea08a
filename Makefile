# openrlaif: `make demo` and `make test` are all a newcomer needs (each installs what is missing into .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-integration test-e2e bench clean

install:
	@bash scripts/install.sh

demo: install
	$(VENV)/bin/openrlaif demo $(ARGS)

# The whole suite: unit (seconds), integration (Ray + DeepSpeed + vLLM on tiny models), e2e (the CLI).
test: install
	$(PYTEST) tests -q

test-fast: install
	$(PYTEST) tests/unit -q

test-integration: install
	$(PYTEST) tests/integration -q

test-e2e: install
	$(PYTEST) tests/e2e -q

# Each script prints a table and writes benchmarks/results/<name>.json; vs_trl.py builds .venv-trl (TRL) once.
bench: install
	$(PY) benchmarks/rollout_throughput.py
	$(PY) benchmarks/train_step.py
	$(PY) benchmarks/zero_vs_ddp.py
	$(PY) benchmarks/judge_cost.py
	$(PY) benchmarks/multi_turn.py
	$(PY) benchmarks/weight_sync.py
	$(PY) benchmarks/vs_trl.py

clean:
	rm -rf $(VENV) runs outputs
