# The two commands a newcomer needs: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell sha1sum pyproject.toml | cut -c1-12)

export DATABASE_URL_TEST ?= postgresql://postgres@127.0.0.1:5432/optout_test
export REDIS_URL_TEST ?= redis://127.0.0.1:6379/15

SECRETS := .run/secrets.env
TEST_ENV := .run/test.env
WITH_TEST_ENV := set -a && . ./$(TEST_ENV) && set +a &&

.PHONY: install run test lint typecheck unit services browser asterisk faults soak bench bench-speech images clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,speech]'
	@rm -f $(VENV)/.installed-* && touch $@

install: $(STAMP)

services:
	@bash tests/services.sh

# Headless Chromium (Debian's package) for the compliance report's rendering test.
browser:
	@bash tests/chromium.sh

# Credentials for the local Asterisk sandbox, generated once per checkout (never committed); `make run` and
# `make test` use the same ones, so either can start the sandbox without locking the other out.
$(SECRETS):
	@mkdir -p .run && umask 077 && for v in ARI_PASSWORD AMI_SECRET AGENT_API_TOKEN; do \
	  echo "$$v=$$(python3 -c 'import secrets; print(secrets.token_urlsafe(18))')"; done > $@

$(TEST_ENV): $(SECRETS)
	@umask 077 && cat $(SECRETS) > $@ && echo "AMI_USERNAME=optout" >> $@ && echo "AMI_HOST=127.0.0.1" >> $@

asterisk: $(TEST_ENV)
	@$(WITH_TEST_ENV) asterisk-docker/sandbox up

lint: install
	$(VENV)/bin/ruff check agent sns_bridge tests

typecheck: install
	$(VENV)/bin/mypy

unit: install services browser asterisk
	@$(WITH_TEST_ENV) $(PY) -m pytest -q

test: install services lint typecheck unit

# The fault-injection suite (tests/faults): PostgreSQL cut or slowed, Redis restarted empty, the agent
# killed, Asterisk restarted, SNS unreachable, SIGTERM in a burst. Each scenario prints a figure line.
faults: install services asterisk
	@$(WITH_TEST_ENV) OPTOUT_FAULTS=1 $(PY) -m pytest -q -rA tests/faults

# The model checker (tests/test_model_checker.py) over many more histories than `make test` runs; it prints
# its seed (OPTOUT_MODEL_SEED=... replays it) and, for a violation, the shrunk history.
soak: install services
	OPTOUT_MODEL_HISTORIES=$${OPTOUT_MODEL_HISTORIES:-400} $(PY) -m pytest -q -s -p no:logging -o timeout=0 tests/test_model_checker.py

run: install $(SECRETS)
	@bash asterisk-docker/run-local.sh

# Benchmarks print figures (they assert nothing); bench_ari writes tests/bench/results/ari.json and ari.png.
bench: install services asterisk
	@$(WITH_TEST_ENV) BENCH_PROFILE=1 $(PY) tests/bench/bench_ari.py
	$(PY) tests/bench/bench_pipeline.py
	$(PY) tests/bench/bench_precheck.py
	@$(WITH_TEST_ENV) $(PY) tests/bench/bench_agi_ami.py
	$(PY) tests/bench/bench_import.py
	$(PY) tests/bench/bench_export.py
	$(PY) tests/bench/bench_sns.py

# Spoken opt-out: the synthetic telephone corpus (espeak-ng, flite, sox) and the accuracy/capacity benchmark.
bench-speech: install
	@command -v espeak-ng >/dev/null && command -v flite >/dev/null && command -v sox >/dev/null \
	  || apt-get install -y -q espeak-ng flite sox >/dev/null
	nice -n 10 $(PY) tests/bench/speech_corpus.py
	nice -n 10 $(PY) tests/bench/speech_bench.py --jobs 2

# Container images (Podman): builds the Asterisk, agent and Lambda images and smoke-tests them together.
images: install services
	@bash asterisk-docker/images.sh

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
