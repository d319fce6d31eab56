# csplatform — the two commands a newcomer needs:
#   make run    set everything up and start the platform (http://127.0.0.1:8000)
#   make test   run the whole test suite (`make test-fast`: the quick tier, for the edit-test loop)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: run test test-fast test-scaleout test-slow stress screenshots setup messages clean-venv

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

# Test tiers (pytest markers, pytest.ini): `make test` runs the whole suite on the embedded
# defaults (SQLite, in-memory channel layer, ORM broker, local-memory cache), then the tests
# marked `services` a second time on the scale-out settings: PostgreSQL, and Redis for the channel
# layer, the cache and the q2 broker. `make test-fast` leaves out every test that starts a server
# process, drives Chromium, loads a server, lints the whole code or trains a whole run: the
# edit-test loop.
SCALEOUT_ENV := DATABASE_URL=postgres://postgres@127.0.0.1:5432/csplatform \
	REDIS_URL=redis://127.0.0.1:6379/13 CSP_CHANNEL_PREFIX=csp-test-scaleout
FAST := not slow and not live and not browser and not load and not lint and not train

test: $(TEST_STAMP)
	$(PY) -m pytest -m "not slow"
	$(MAKE) --no-print-directory test-scaleout

# Two pytest processes, one a core (pytest runs one test at a time; each process has its own test
# database): the ML half's report is printed after the apps' half. torch on one thread in each:
# a second would only fight the other process for its core. Split by directory, evened out by one
# module measured with --durations=0 on a lightly loaded 2-core machine: llm + tests took 171 s,
# knowledge + training + chat 151 s, tests/test_login_throttle.py 10 s, so it runs with the apps.
FAST_MOVED := tests/test_login_throttle.py
test-fast: $(TEST_STAMP)
	@ml_log=$$(mktemp); \
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "$(FAST)" llm tests --ignore=$(FAST_MOVED) >$$ml_log 2>&1 & ml=$$!; \
	OMP_NUM_THREADS=1 $(PY) -m pytest -m "$(FAST)" knowledge training chat $(FAST_MOVED); apps=$$?; \
	wait $$ml; ml_status=$$?; cat $$ml_log; rm -f $$ml_log; \
	echo "make test-fast: apps exit $$apps, llm + tests exit $$ml_status"; \
	test $$apps -eq 0 && test $$ml_status -eq 0

test-scaleout: $(TEST_STAMP)
	@pg_isready -h 127.0.0.1 -p 5432 -q || { echo "test-scaleout needs PostgreSQL on 127.0.0.1:5432 (see .ci/run)"; exit 1; }
	@redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null || { echo "test-scaleout needs Redis on 127.0.0.1:6379 (see .ci/run)"; exit 1; }
	$(SCALEOUT_ENV) $(PY) -m pytest -m "services and not slow" -p no:cacheprovider

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m slow

# The issue #6 load and abuse scenarios full size against a live daphne (minutes; a Markdown table).
stress: $(TEST_STAMP)
	$(PY) benchmarks/stress.py

# Remake the README's pictures (docs/img/*.png): headless Chromium on a throwaway platform with the
# sample data and a tiny model's training run (docs/screenshots.py; about a minute).
screenshots: $(TEST_STAMP)
	$(PY) docs/screenshots.py

# Regenerate the translation catalogue after changing translatable strings (needs gettext).
messages:
	$(PY) manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var
	$(PY) manage.py compilemessages -l zh_Hans --ignore=.venv

clean-venv:
	rm -rf $(VENV)
