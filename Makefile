# csplatform — the two commands a newcomer needs:
#   make run    set everything up and start the platform (http://127.0.0.1:8000)
#   make test   run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: run test test-scaleout test-slow stress setup messages clean-venv

$(RUNTIME_STAMP): requirements.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	touch $@

$(TEST_STAMP): $(RUNTIME_STAMP) requirements-test.txt
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

setup: $(RUNTIME_STAMP)
	$(PY) manage.py migrate --no-input -v0
	$(PY) manage.py prepare_base_model
	$(PY) manage.py bootstrap

run: setup
	$(PY) manage.py serve

# `make test` runs the suite on the embedded defaults (SQLite, in-memory channel layer, ORM
# broker, local-memory cache), then runs the tests where the services matter a second time on the
# scale-out settings: PostgreSQL, and Redis for the channel layer, the cache and the q2 broker.
SCALEOUT_ENV := DATABASE_URL=postgres://postgres@127.0.0.1:5432/csplatform \
	REDIS_URL=redis://127.0.0.1:6379/13 CSP_CHANNEL_PREFIX=csp-test-scaleout
SCALEOUT_TESTS := knowledge \
	training/tests/test_training_run.py training/tests/test_training_start.py training/tests/test_training_service.py \
	training/tests/test_snapshots.py training/tests/test_lineage.py training/tests/test_retraining.py \
	chat/tests/test_websocket.py chat/tests/test_handoff.py chat/tests/test_chat_api.py chat/tests/test_analytics.py \
	chat/tests/test_admin.py chat/tests/test_inference_worker.py \
	tests/test_hardening.py tests/test_permission_matrix.py tests/test_scaleout_throttle.py tests/test_login_throttle.py

test: $(TEST_STAMP)
	$(PY) -m pytest -m "not slow"
	$(MAKE) --no-print-directory test-scaleout

test-scaleout: $(TEST_STAMP)
	@pg_isready -h 127.0.0.1 -p 5432 -q || { echo "test-scaleout needs PostgreSQL on 127.0.0.1:5432 (see .ci/run)"; exit 1; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "test-scaleout needs Redis on 127.0.0.1:6379 (see .ci/run)"; exit 1; }
	$(SCALEOUT_ENV) $(PY) -m pytest -m "not slow" -p no:cacheprovider $(SCALEOUT_TESTS)

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m slow

# The issue #6 load and abuse scenarios full size against a live daphne (minutes; a Markdown table).
stress: $(TEST_STAMP)
	$(PY) benchmarks/stress.py

# Regenerate the translation catalogue after changing translatable strings (needs gettext).
messages:
	$(PY) manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var
	$(PY) manage.py compilemessages -l zh_Hans --ignore=.venv

clean-venv:
	rm -rf $(VENV)
