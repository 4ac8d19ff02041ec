# traboule: the two commands are `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
# Test processes in parallel (pytest-xdist); most tests wait on sockets, peers and subprocesses, so two workers
# on two cores take about half the time of one. TEST_WORKERS=0 runs them in this process.
TEST_WORKERS ?= 2

.PHONY: run test lint bench peers fhir-peer clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

## Start the whole loop in the foreground on loopback (MLLP 2575, MWL 11112 + MPPS 11113 AE TRABOULE, HTTP 8080 with /fhir)
run: $(STAMP)
	$(VENV)/bin/traboule run

## Install what the tests need (Python deps; dcmtk, rabbitmq-server, orthanc, postgresql via apt when root) and run them
test: $(STAMP) peers fhir-peer
	$(VENV)/bin/ruff check .
	$(VENV)/bin/pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadgroup

## Debian packages of the real peers used by the tests (haproxy checks deploy/; chromium drives the console; rsyslog is the audit repository; installed only when missing and running as root)
peers:
	@missing=""; \
	command -v findscu >/dev/null 2>&1 || missing="$$missing dcmtk"; \
	test -x /usr/lib/rabbitmq/bin/rabbitmq-server || missing="$$missing rabbitmq-server"; \
	test -x /usr/sbin/Orthanc || missing="$$missing orthanc"; \
	test -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so || missing="$$missing orthanc-dicomweb"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	command -v haproxy >/dev/null 2>&1 || missing="$$missing haproxy"; \
	command -v chromium >/dev/null 2>&1 || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null 2>&1 || missing="$$missing chromium-driver"; \
	test -x /usr/sbin/rsyslogd || missing="$$missing rsyslog"; \
	ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1 || missing="$$missing rsyslog-gnutls"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else \
	    echo "missing Debian packages:$$missing (tests needing them will be skipped; run as root to install)"; \
	  fi; \
	fi

## npm packages of the in-memory FHIR R4 test server (tests/fhir_server), installed only when missing
fhir-peer:
	@if [ ! -d tests/fhir_server/node_modules ]; then \
	  if command -v npm >/dev/null 2>&1; then \
	    (cd tests/fhir_server && npm ci --no-audit --no-fund) || echo "npm ci failed (the FHIR delivery tests will be skipped)"; \
	  else \
	    echo "npm is missing (the FHIR delivery tests will be skipped)"; \
	  fi; \
	fi

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP) peers fhir-peer
	$(PY) bench/mllp_ingest.py
	$(PY) bench/mllp_ingest.py --patients each
	$(PY) bench/ingest_steps.py
	$(PY) bench/mapping.py
	$(PY) bench/audit_encode.py
	$(PY) bench/mwl_find.py
	$(PY) bench/fhir_push.py
	$(PY) bench/study_to_imagingstudy.py
	@if [ -n "$$TRABOULE_CDA_VALIDATORS" ]; then \
	  $(PY) bench/cda_validate.py --validators "$$TRABOULE_CDA_VALIDATORS" && \
	  $(PY) bench/reports.py --validators "$$TRABOULE_CDA_VALIDATORS"; \
	else echo "set TRABOULE_CDA_VALIDATORS to a testContenuCDA tree for bench/cda_validate.py and bench/reports.py"; fi

clean:
	rm -rf $(VENV) var .pytest_cache
