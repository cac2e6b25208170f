# featcache make targets: each one calls the CLI inside the project's virtual environment.
# `make demo` and `make test` create .venv and install the project on first use.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
FEATCACHE := $(BIN)/python -m pipeline
INSTALLED := $(VENV)/.installed

DATA ?= digits
BACKBONE ?= efficientnet_lite0
TAPS ?= pre_logits
HEADS ?= logreg,linear,mlp,knn
STORE ?=
BACKBONES ?=
EXTRA ?=

.PHONY: install demo extract heads taps inspect verify bench finetune advise test test-fast clean

$(INSTALLED): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(INSTALLED)

install: $(INSTALLED)

demo: $(INSTALLED)
	$(FEATCACHE) demo

extract: $(INSTALLED)
	$(FEATCACHE) extract --data $(DATA) --backbone $(BACKBONE) --taps $(TAPS) $(EXTRA)

heads: $(INSTALLED)
	$(FEATCACHE) heads --heads $(HEADS) $(if $(STORE),--store $(STORE)) $(EXTRA)

taps: $(INSTALLED)
	$(FEATCACHE) taps $(BACKBONE)

inspect: $(INSTALLED)
	$(FEATCACHE) inspect $(if $(STORE),$(STORE),$(error inspect needs STORE=path/to/store))

verify: $(INSTALLED)
	$(FEATCACHE) verify $(if $(STORE),$(STORE),$(error verify needs STORE=path/to/store))

bench: $(INSTALLED)
	$(FEATCACHE) bench --data $(DATA) $(if $(BACKBONES),--backbones $(BACKBONES)) $(EXTRA)

finetune: $(INSTALLED)
	$(FEATCACHE) finetune $(if $(STORE),--store $(STORE),--data $(DATA) --backbone $(BACKBONE)) $(EXTRA)

advise: $(INSTALLED)
	$(FEATCACHE) advise $(if $(STORE),$(STORE),$(error advise needs STORE=path/to/store)) $(EXTRA)

test: $(INSTALLED)
	$(BIN)/python -m pytest

test-fast: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow and not real_data"

clean:
	rm -rf data/features data/results
