# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 12434
PG_URL ?= postgres://postgres@127.0.0.1:5432/nomyo_router_test

.PHONY: run test install install-dev lint types imports migrations-check test-sqlite test-postgres bench serve-uvicorn clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt requirements.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v 0
	$(PY) manage.py ensure_superuser
	@echo "nomyo-router: http://$(HOST):$(PORT)/  (admin: http://$(HOST):$(PORT)/admin/)"
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) nomyo_site.asgi:application

serve-uvicorn: install
	$(PY) manage.py migrate --noinput
	$(VENV)/bin/uvicorn nomyo_site.asgi:application --host $(HOST) --port $(PORT) --no-access-log

test: install-dev lint types imports migrations-check test-sqlite test-postgres

lint: install-dev
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

types: install-dev
	$(VENV)/bin/mypy .

# The import graph's contracts ([tool.importlinter] in pyproject.toml; docs/architecture.md).
imports: install-dev
	$(VENV)/bin/lint-imports --no-cache

migrations-check: install-dev
	$(PY) manage.py makemigrations --check --dry-run

test-sqlite: install-dev
	$(VENV)/bin/pytest -q

# Runs again on PostgreSQL when one answers (CI starts it; see .ci/run).
test-postgres: install-dev
	@if $(PY) -c "import psycopg,sys; psycopg.connect('postgres://postgres@127.0.0.1:5432/postgres', connect_timeout=3).close()" 2>/dev/null; then \
		echo "== PostgreSQL suite =="; DATABASE_URL=$${DATABASE_URL:-$(PG_URL)} $(VENV)/bin/pytest -q; \
	else echo "== PostgreSQL not reachable at 127.0.0.1:5432: PostgreSQL suite skipped =="; fi

bench: install-dev
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
