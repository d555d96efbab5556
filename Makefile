# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PIP     = $(VENV)/bin/pip -q --disable-pip-version-check
EXTRAS ?= test,plot,sevennet,chgnet,oracles,dask

.PHONY: demo demo-smoke test test-core test-mace test-sklearn-latest docs lint bench clean gpu-wheels

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned to the CPU wheel on disk, so no extra can pull a CUDA build
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[$(EXTRAS)]" "torch==2.13.0"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/skntk demo --out demo_out

# The main job end to end on a small pool (CI runs it, so a regression in `skntk demo` cannot land).
demo-smoke: $(VENV)/.installed
	$(VENV)/bin/skntk demo --out demo_out --max-pool 40 --no-plot

test: test-core test-mace

test-core: $(VENV)/.installed
	$(VENV)/bin/python -m pytest

# MACE pins e3nn==0.4.4, SevenNet needs e3nn>=0.5: MACE gets its own virtualenv.
test-mace:
	$(MAKE) VENV=.venv-mace EXTRAS=test,mace .venv-mace/.installed
	.venv-mace/bin/python -m pytest tests/models/test_mace.py tests/models/test_finetune_backends.py

# The newest scikit-learn release, above the upper bound of pyproject.toml, in its own fresh
# virtualenv, on a fast subset (skntk/_sklearn_compat.py holds the private API it may break).
# pip warns that skntk requires a lower scikit-learn: that is the point of this target.
SKLATEST ?= .venv-sklatest
test-sklearn-latest:
	rm -rf $(SKLATEST)
	$(PYTHON) -m venv $(SKLATEST)
	$(SKLATEST)/bin/pip -q --disable-pip-version-check install --upgrade pip
	$(SKLATEST)/bin/pip -q --disable-pip-version-check install torch==2.13.0
	$(SKLATEST)/bin/pip -q --disable-pip-version-check install -e ".[test]" "torch==2.13.0"
	$(SKLATEST)/bin/pip -q --disable-pip-version-check install --upgrade scikit-learn
	$(SKLATEST)/bin/python -c "import sklearn; print('newest scikit-learn:', sklearn.__version__)"
	$(SKLATEST)/bin/python -m pytest tests/test_common.py tests/selection tests/test_pipeline.py \
	    tests/test_sklearn_compat.py

# The documentation site (mkdocs.yml): --strict turns every warning into an error; the gallery
# runs every examples/*.py in its fast mode (docs/generated/ is cleared so none is skipped as
# unchanged). Output in site/ (gitignored). SKNTK_DOCS_RUN_EXAMPLES=false: gallery not executed.
docs: $(VENV)/.installed
	$(PIP) install -e ".[docs]" "torch==2.13.0"
	rm -rf docs/generated
	NO_MKDOCS_2_WARNING=1 SKNTK_EXAMPLES_FAST=1 MPLBACKEND=agg \
	    $(VENV)/bin/mkdocs build --strict --site-dir site

lint: $(VENV)/.installed
	$(VENV)/bin/pip -q install ruff && $(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .venv-mace demo_out site docs/generated

# Wheels for benchmarks/gpu_check.py on a lent GPU machine (Python 3.12, torch already there, no
# network): ase, SevenNet and SevenNet's two missing dependencies, about 47 MB (docs/benchmarks.md).
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl ase==3.29.0 sevenn==0.13.0 braceexpand matscipy
