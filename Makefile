# The README's two commands: `make demo` and `make test`. Both set up .venv when it is missing or stale.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BOSON_SPEC ?= boson-multimodal==0.1.1
DEMO_RUN ?= fixtures/runs/eval-loss-missing
DEMO_OUT ?= higgs-diag-report
PY := $(VENV)/bin/python
STAMP := $(VENV)/.higgs-diag-installed

.PHONY: demo test venv docs bench clean fuzz

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[model,test]"
	$(PY) -m pip install --quiet --no-deps "$(BOSON_SPEC)"
	@touch $(STAMP)

demo: $(STAMP)
	@echo "higgs-diag analyze $(DEMO_RUN) --output $(DEMO_OUT)" >&2
	@$(VENV)/bin/higgs-diag analyze $(DEMO_RUN) --output $(DEMO_OUT) --fail-on never
	@echo "" >&2
	@echo "Report written to $(DEMO_OUT)/ (report.html, report.md, report.json, plots/)" >&2

test: $(STAMP)
	$(PY) -m pytest -q

# The readers' property-based fuzzing with a large budget (tests/test_fuzz.py; `make test` runs a few seconds of
# it): FUZZ_EXAMPLES inputs for each of the 5 properties, random seeds. See "Hostile input" in docs/design.md.
FUZZ_EXAMPLES ?= 20000
fuzz: $(STAMP)
	HIGGS_DIAG_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q -p no:cacheprovider tests/test_fuzz.py --durations=5 \
		--hypothesis-show-statistics -W ignore::hypothesis.errors.HypothesisWarning

docs: $(STAMP)
	$(PY) -m higgs_diag.checks.docgen > docs/checks.md

# Every benchmark in turn (benchmarks/run_all.py), then one table of their targets and the total time; exits
# nonzero only when a benchmark crashes (a missed target is reported, not an error). BENCH_ARGS=--quick skips the
# largest growth size; BENCH_ARGS=--only=bench_triage,bench_replay runs a subset. See docs/performance.md.
BENCH_ARGS ?=
bench: $(STAMP)
	$(PY) benchmarks/run_all.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
