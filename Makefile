# Berth: `make demo` runs the portal with simulated hosts; `make test` runs the checks.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint schema deploy-check pytest browser-test test-scaleout bench install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt requirements-dev.txt | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput --verbosity 0
	@echo "Demo: admin actions do not ask for a second factor (BERTH_REQUIRE_2FA=0); see README."
	BERTH_REQUIRE_2FA=$${BERTH_REQUIRE_2FA:-0} $(PY) manage.py demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The OpenAPI schema must generate without a single warning.
schema: $(STAMP)
	$(PY) manage.py spectacular --validate --fail-on-warn > /dev/null

# Django's deployment checks under the production settings of docs/operations.md.
deploy-check: $(STAMP)
	BERTH_TLS=1 BERTH_DEBUG=0 $(PY) manage.py check --deploy --fail-level WARNING

pytest: $(STAMP)
	$(PY) -m pytest -m "not browser"

# The portal in Debian's Chromium (apt-get install chromium; Playwright never downloads
# one). Its own invocation, without pytest-asyncio (so its asyncio_* options are
# reported unknown): the sync Playwright API must not share a run with asyncio tests.
browser-test: $(STAMP)
	$(PY) -m pytest tests/browser -m browser -p no:asyncio

test: lint schema deploy-check pytest browser-test

# The pytest suite again on PostgreSQL + a Redis channel layer (several portal processes),
# both started on loopback by scripts/services.sh and stopped whatever the outcome, with
# the soak test for SOAK_SECONDS. Needs Debian's postgresql and redis-server packages.
SOAK_SECONDS ?= 60
test-scaleout: $(STAMP)
	@services=$$(scripts/services.sh start) || exit 1; eval "$$services"; \
	trap 'scripts/services.sh stop' EXIT; trap 'exit 130' INT TERM; \
	echo "scale-out pass: PostgreSQL + Redis in $$BERTH_SERVICES_DIR"; \
	$(PY) -m pytest -m "not browser" --soak-seconds=$(SOAK_SECONDS)

bench: $(STAMP)
	@ls bench/*.py >/dev/null 2>&1 || { echo "no benchmarks yet"; exit 0; }
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
