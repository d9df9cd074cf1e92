# make demo   run the demo: SmolLM2-135M-Instruct answers a few questions (example.py)
# make test   run the tests
#
# Each sets up what it needs first, from a fresh clone: a virtual environment (.venv here, unless one
# is active), torch (scripts/install_torch.sh: a torch already there is kept), this package and its
# dependencies, the demo model. The installs happen once per environment, and again only when
# requirements*.txt or setup.py change (stamp files inside the environment).

BASE_PYTHON ?= python3
VENV := $(or $(VIRTUAL_ENV),$(CURDIR)/.venv)
PYTHON := $(VENV)/bin/python
INSTALLED := $(VENV)/.llama_int8-installed
TEST_INSTALLED := $(VENV)/.llama_int8-test-installed

.PHONY: demo test

demo: $(INSTALLED)
	$(PYTHON) -m llama_int8.demo --fetch >/dev/null
	$(PYTHON) example.py

test: $(TEST_INSTALLED)
	$(PYTHON) -m llama_int8.demo --fetch >/dev/null
	$(PYTHON) -m pytest -q

$(PYTHON):
	$(BASE_PYTHON) -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip

# The installed torch is held as a constraint: a dependency asking for another torch then fails to
# resolve instead of replacing a CPU build with a multi-GB CUDA one.
$(INSTALLED): requirements.txt setup.py scripts/install_torch.sh | $(PYTHON)
	scripts/install_torch.sh $(PYTHON)
	$(PYTHON) -c "from importlib.metadata import version; print('torch==' + version('torch'))" > $(VENV)/.llama_int8-torch.txt
	$(PYTHON) -m pip install --quiet --constraint $(VENV)/.llama_int8-torch.txt -e .
	touch $@

$(TEST_INSTALLED): requirements-test.txt $(INSTALLED)
	$(PYTHON) -m pip install --quiet --constraint $(VENV)/.llama_int8-torch.txt -r requirements-test.txt
	touch $@
