# make test   run the whole suite (creates .venv on first use)
# make serve  start the steering server (creates .venv on first use)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vllm-steer-installed

.PHONY: test serve venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml scripts/bootstrap.sh
	scripts/bootstrap.sh

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

serve: $(STAMP)
	$(PY) launch.py serve $(ARGS)

clean:
	rm -rf $(VENV) .cache
