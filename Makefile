# reservoir — the two set-up commands are `make demo` and `make test`; each installs what it needs.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: demo test lint deploy-check sanity bench-quick bench build release clean

release:
	$(CARGO) build --release --locked

build:
	$(CARGO) build --locked

## The main job on an embedded default: a sample dataset through the cache, cold and warm.
demo:
	scripts/install-deps.sh demo
	$(MAKE) release
	scripts/demo.sh

## Every test: formatting, lints, unit tests and real-mount integration tests (root, /dev/fuse).
test:
	scripts/install-deps.sh test
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(MAKE) deploy-check
	$(CARGO) test --locked --all-targets

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## The Kubernetes manifests against the API schemas (offline).
deploy-check:
	scripts/install-deps.sh deploy
	kubernetes-validate -k 1.30.0 --strict deploy/kubernetes/*.yaml deploy/kubernetes/examples/*.yaml

## The CSI conformance tool against `reservoir csi` (skipped, saying so, without csi-sanity).
sanity: release
	csi-sanity/run.sh

## Side-by-side numbers at a reduced scale (a few minutes); writes docs/benchmarks.md.
bench-quick:
	scripts/install-deps.sh bench
	$(CARGO) build --release --locked --bin reservoir --example readtree
	python3 bench/run.py --scale quick

bench:
	scripts/install-deps.sh bench
	$(CARGO) build --release --locked --bin reservoir --example readtree
	python3 bench/run.py --scale full

clean:
	$(CARGO) clean
