# One place for the commands the README and CI use. `make run` and `make test`
# set everything up on a fresh machine (Python >= 3.10 with venv and pip).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
OUT    ?= results

.PHONY: run test lint bench figures clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; nothing later may upgrade it
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lowrank-ggn --out $(OUT)

# one worker per core (pytest-xdist): the smoke runs of benchmarks and figures
# dominate and run side by side
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist worksteal lowrank_ggn tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps backpack-for-pytorch vivit-for-pytorch \
	  curvlinops-for-pytorch unfoldNd einops einconv linear_operator opt-einsum tqdm \
	  jaxtyping typeguard wadler_lindig psutil
	$(BIN)/python benchmarks/bench_gram.py

# Every paper figure from seeds, full mode, CPU (results JSON in each experiment
# folder, figures/<name>.png|pdf); measured 27 min on 2 cores for the first six
# (2026-11-29) plus 6 min for optimizers on one core: about 33 min.
# The peers (make bench installs them) are optional: missing ones are skipped.
FIGURES = digits_spectrum spectrum_approximations topk_runtime batch_size_limits \
	training_monitoring batchnorm_structure optimizers

figures: $(STAMP)
	for name in $(FIGURES); do \
	  $(BIN)/python experiments/$$name/run.py && \
	  $(BIN)/python experiments/$$name/plot.py || exit 1; \
	done

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
