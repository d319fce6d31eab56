# csplatform — the two commands a newcomer needs:
#   make run    set everything up and start the platform (http://127.0.0.1:8000)
#   make test   run the whole test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME_STAMP := $(VENV)/.runtime-installed
TEST_STAMP := $(VENV)/.test-installed

.PHONY: run test test-slow setup messages clean-venv

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

test: $(TEST_STAMP)
	$(PY) -m pytest -m "not slow"

test-slow: $(TEST_STAMP)
	$(PY) -m pytest -m slow

# Regenerate the translation catalogue after changing translatable strings (needs gettext).
messages:
	$(PY) manage.py makemessages -l zh_Hans --ignore=.venv --ignore=var
	$(PY) manage.py compilemessages -l zh_Hans --ignore=.venv

clean-venv:
	rm -rf $(VENV)
