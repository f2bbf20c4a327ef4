# One place for the commands the README and CI use. `make run` and `make test`
# set everything up on a fresh machine (Python >= 3.10 with venv and pip).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
OUT    ?= results
ZOO      = timm==1.0.31 transformers==5.23.0 torchvision==0.29.1
ZOO_DEPS = "huggingface_hub>=1.31,<3" "tokenizers>=0.23.1,<0.24" "safetensors>=0.8" \
	"regex>=2025.10.22" pyyaml typer

.PHONY: run test lint bench figures clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build; nothing later may upgrade it
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the model zoos for tests/test_zoo.py: their own dependencies first (none
	# needs torch), then timm, transformers and torchvision without theirs, so
	# that the CPU torch stays (torchvision's C ops do not load on it: the tests
	# import it through tests/zoo_imports.py)
	$(BIN)/python -m pip install --quiet $(ZOO_DEPS)
	$(BIN)/python -m pip install --quiet --no-deps $(ZOO)
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/lowrank-ggn --out $(OUT) --overwrite

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
# folder, figures/<name>.png|pdf); the committed runs took 31.4 min together
# (20.6 min for the first six, 10.4 min for optimizers and 0.3 min for ggn_diagonal;
# README "Figures").
# The peers (make bench installs them) are optional: missing ones are skipped.
FIGURES = digits_spectrum spectrum_approximations topk_runtime batch_size_limits \
	training_monitoring batchnorm_structure optimizers ggn_diagonal

figures: $(STAMP)
	for name in $(FIGURES); do \
	  $(BIN)/python experiments/$$name/run.py && \
	  $(BIN)/python experiments/$$name/plot.py || exit 1; \
	done

clean:
	rm -rf $(VENV) $(OUT) build *.egg-info
