# nomad-vm: the README's front door. `make demo` and `make test` set everything up first.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/.tools/bin:$(CURDIR)/$(VENV)/bin:$(PATH)
export NOMAD_VM_CACHE ?= $(CURDIR)/.cache/guests

.PHONY: setup host-packages vm-user venv bytecode nomad consul virtiofsd vhost-device-vsock guests demo demo-stop cluster cluster-stop test test-unit lint docs proto bench clean

setup: host-packages venv vm-user bytecode nomad consul virtiofsd vhost-device-vsock guests

host-packages:
	@scripts/setup-host.sh

venv: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

# The unprivileged user QEMU and virtiofsd run as (the plugin's vm_user, default nomad-vm).
vm-user: venv
	@$(VENV)/bin/nomad-vm vm-user

# Bytecode for our own (editable) modules: with PYTHONDONTWRITEBYTECODE set, as on these
# machines, every plugin start would otherwise recompile them (~50 ms of the handshake).
bytecode: venv
	@$(PY) -m compileall -q src

nomad:
	@scripts/install-go-tool.sh nomad

# Only tests/e2e/test_script_check.py needs it (script checks run through Consul).
consul:
	@scripts/install-go-tool.sh consul

virtiofsd: host-packages
	@scripts/install-rust-tool.sh virtiofsd

# Only tests/integration/test_vsock_agent_guest.py needs it (the guest agent over hybrid vsock).
vhost-device-vsock: host-packages
	@scripts/install-rust-tool.sh vhost-device-vsock

# debootstrap, cpio and xz come with host-packages.
guests: venv host-packages
	$(VENV)/bin/nomad-vm image build tiny
	$(VENV)/bin/nomad-vm image build debian

demo: setup
	$(VENV)/bin/nomad-vm demo

demo-stop:
	$(VENV)/bin/nomad-vm demo --stop

# A Nomad server and three clients, each in a network namespace of its own (docs/cluster.md).
cluster: setup
	$(VENV)/bin/nomad-vm cluster

cluster-stop:
	$(VENV)/bin/nomad-vm cluster --stop

# The whole suite: unit, integration (real QEMU under TCG) and e2e (a real Nomad agent).
# TEST_JOBS test files run at once (pytest-xdist; each file stays on one worker, so a file's
# shared agent or guest is made once; tests/conftest.py says which run one after another);
# TEST_JOBS=0 runs them one by one.
TEST_JOBS ?= 2
test: setup
	$(PY) -m pytest -q -ra -n $(TEST_JOBS) --dist loadfile --durations=25 tests

test-unit: venv
	$(PY) -m pytest -q tests/unit

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/nomad-vm docs --check

docs: venv
	$(VENV)/bin/nomad-vm docs

proto: venv
	scripts/gen-proto.sh

bench: setup
	$(PY) bench/plugin_start.py
	$(PY) bench/start_latency.py
	$(PY) bench/thin_copy.py
	$(PY) bench/many_vms.py
	$(PY) bench/density.py
	$(PY) bench/network_start.py
	$(PY) bench/ksm.py
	$(PY) bench/free_page_reporting.py

clean:
	rm -rf $(VENV) .tools .cache build *.egg-info
