# reservoir — the two set-up commands are `make demo` and `make test`; each installs what it needs.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: demo test lint deploy-check sanity bench-quick bench bench-writes build release clean

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

## The CSI conformance tool against `reservoir csi`. Without csi-sanity it says SKIPPED and
## fails (exit 77): a run that tested nothing never counts as a pass.
sanity: release
	csi-sanity/run.sh

## reservoir against direct NFS reads and peer caches (JuiceFS, rclone, bindfs, local disk)
## over an emulated 1 Gbit/s, 1 ms link; writes docs/benchmarks.md and its charts. Binaries come
## from $CARGO_TARGET_DIR (default target), which bench/run.py reads too. Extra flags: BENCH_ARGS.
BENCH_BUILD = $(CARGO) build --release --locked --bin reservoir --example readtree --example delayproxy

## The same harness at a reduced scale (about 15 minutes).
bench-quick:
	scripts/install-deps.sh bench
	$(BENCH_BUILD)
	python3 bench/run.py --scale quick $(BENCH_ARGS)

## Full scale: 100,000 small files and 1-2 GiB files (about five hours on two cores). It
## resumes: run it again after an interruption and it measures only the steps left undone.
bench:
	scripts/install-deps.sh bench
	$(BENCH_BUILD)
	python3 bench/run.py --scale full --resume $(BENCH_ARGS)

## Read-write volumes: 1 GiB checkpoint-like writes through the mount against writing to the
## source directly (a directory, and our NFS client against ganesha); prints a Markdown table.
bench-writes:
	scripts/install-deps.sh test
	$(CARGO) test --release --locked --test write_bench -- --ignored --nocapture

clean:
	$(CARGO) clean
