# The README's two commands: `make demo` and `make test`. Both set up what they need.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test unit integration clean

setup:
	WITH_RUNTIMES=1 ./scripts/setup.sh

demo:
	./scripts/setup.sh
	$(PY) scripts/demo.py

test: setup
	./scripts/run_tests.sh

unit:
	./scripts/setup.sh
	$(PY) -m pytest -q tests/unit

integration: setup
	$(PY) -m pytest -q tests/integration

clean:
	rm -rf $(VENV) build dist *.egg-info

.PHONY: bench bench-overlay bundle shim install kind-up kind-down
bench: setup
	$(PY) scripts/bench.py
	$(PY) scripts/overlay_bench.py

# Pod-to-pod across nodes alone: same node, direct route, VXLAN (scripts/overlay_bench.py).
bench-overlay: setup
	$(PY) scripts/overlay_bench.py

# The static front end (Go, standard library only): dist/shim/cni-bridge.
shim:
	./scripts/build_shim.sh

# cni-bridge (static front end), cni-bridge-python and cni-ipam into DEST.
DEST ?= /opt/cni/bin
install: setup
	./scripts/install_front_end.sh $(DEST)

bundle: setup
	./scripts/bundle.sh

kind-up: bundle
	./scripts/kind.sh up

kind-down:
	./scripts/kind.sh down
