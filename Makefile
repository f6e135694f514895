# make test-fast  the import contracts, then the tests that start no engine or server (< 1 min)
# make test       the whole suite on Model Runner V1, then the engine tests on V2
# make serve      start the steering server on SmolLM2-135M-Instruct with its concept vectors
# Each creates .venv on first use.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vllm-steer-installed
# Model Runner V2 (vLLM's GPU default) on this CPU, through Triton's interpreter: test-only.
V2_ON_CPU := PYTHONPATH=tests/v2_on_cpu VLLM_STEER_TEST_V2_ON_CPU=1

.PHONY: test test-fast test-v1 test-v2 serve venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh

test: test-v1 test-v2

test-fast: $(STAMP)
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -m "not engine and not server" $(PYTEST_ARGS)

test-v1: $(STAMP)
	$(PY) -m pytest --runner v1 $(PYTEST_ARGS)

test-v2: $(STAMP)
	$(V2_ON_CPU) $(PY) -m pytest --runner v2 -m runner $(PYTEST_ARGS)

serve: $(STAMP)
	$(PY) -m vllm_steer.cli serve --model smollm2 $(ARGS)

clean:
	rm -rf $(VENV) .cache
