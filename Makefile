# openrlaif: `make demo` and `make test` are all a newcomer needs (each installs what is missing into .venv).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST := $(PY) -m pytest -p no:cacheprovider
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER ?= 0
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-fast test-integration test-e2e bench gpu-wheels gpu-check clean

install:
	@bash scripts/install.sh

demo: install
	$(VENV)/bin/openrlaif demo $(ARGS)

# The whole suite: unit (seconds), integration (Ray + DeepSpeed + vLLM on tiny models), e2e (the CLI), in one
# pytest stream (two streams side by side, e2e beside the rest, took 46.5 min vs 48.7 in one: a gain inside this
# machine's day-to-day spread, not worth two Ray clusters contending for 2 cores).
test: install
	$(PYTEST) tests -q -rfEs --durations=40

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
	$(PY) benchmarks/async_steps.py
	$(PY) benchmarks/vs_trl.py

# The GPU check (scripts/gpu_check.sh) runs where Ray and vLLM are not; what it needs that such a machine lacks
# (DeepSpeed, pydantic, hjson) is downloaded here as wheels for its Python (3.12, x86-64) into .gpu_wheels/.
GPU_PY ?= 3.12
gpu-wheels:
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY) \
	  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .gpu_wheels \
	  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
	$(PY) -m pip wheel --quiet --no-deps -w .gpu_wheels deepspeed==0.19.8

gpu-check:
	bash scripts/gpu_check.sh $(ARGS)

clean:
	rm -rf $(VENV) runs outputs
