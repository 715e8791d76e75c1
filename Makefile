# `make demo` runs the main job on the embedded default config; `make digits` the digits image benchmark;
# `make test` runs the suite.
# Each creates/refreshes .venv; a stamp file keeps a second run from reinstalling anything.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
EXTRAS ?= dev,8bit,deepspeed,digits
# the default suite; `make test PYTEST_ARGS=` runs the slow tests too (distributed ZeRO-1/3, 8-bit, …)
PYTEST_ARGS ?= -m "not slow"
export TRITON_INTERPRET ?= 1

.PHONY: demo digits test venv clean

venv: $(VENV)/.installed

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first: the CPU wheel; everything after it is installed under a constraint that pins it.
$(VENV)/.torch: | $(PY)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	touch $@

$(VENV)/.installed: $(VENV)/.torch setup.py constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $@

demo: venv
	$(PY) -m fastnabla.train --config configs/toy2d.yaml --output-dir runs/toy2d $(ARGS)

# pretrains the digits classifier and UNet when not cached (~/.cache/fastnabla/digits), reports their quality, then
# finetunes; the first run also draws the 50,000-sample importance-sampling target (cached). torch's own thread count
# (every core): on this 2-core machine two threads pretrain 1.4× faster than one (docs/digits.md, timing).
digits: venv
	$(PY) -m fastnabla.cli pretrain-digits --config configs/digits.yaml \
		--report runs/digits/pretrained.json $(ARGS)
	$(PY) -m fastnabla.train --config configs/digits.yaml \
		--output-dir runs/digits $(ARGS)

test: venv
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
