# reservoir — the two set-up commands are `make demo` and `make test`; each installs what it needs.
SHELL := /bin/bash
export PATH := $(HOME)/.cargo/bin:$(PATH)
CARGO ?= cargo

.PHONY: demo test lint deploy-check sanity image image-check e2e bench-quick bench bench-writes crash-stress upgrade-check model fuzz-smoke fuzz build release clean

release:
	$(CARGO) build --release --locked

build:
	$(CARGO) build --locked

## The main job on an embedded default: a sample dataset through the cache, cold and warm.
demo:
	scripts/install-deps.sh demo
	$(MAKE) release
	scripts/demo.sh

## Every test: formatting, lints, unit tests, real-mount integration tests (root, /dev/fuse),
## a short run of every fuzz target, the user Dockerfile, and the end-to-end test in a real
## Kubernetes.
test:
	scripts/install-deps.sh test
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings
	$(MAKE) deploy-check
	$(CARGO) test --locked --all-targets
	$(MAKE) fuzz-smoke
	$(MAKE) image-check RESERVOIR_BIN=target/debug/reservoir
	$(MAKE) e2e RESERVOIR_BIN=target/debug/reservoir

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

## The Kubernetes manifests against the API schemas (offline). kustomization.yaml and
## settings.yaml (a patch) are not objects; the e2e applies all of it to Kubernetes 1.20.
MANIFESTS = $(filter-out %/kustomization.yaml %/settings.yaml,$(wildcard deploy/kubernetes/*.yaml))
deploy-check:
	scripts/install-deps.sh deploy
	kubernetes-validate -k 1.32.0 --strict $(MANIFESTS) deploy/kubernetes/examples/*.yaml

## The image deploy/kubernetes names (the release binary and its libraries), written as an OCI
## archive under target/image and imported into the local containerd when one runs. No Docker.
image:
	scripts/install-deps.sh image
	scripts/image.sh import

## ./Dockerfile built with buildah and checked against the image `make image` makes.
## RESERVOIR_BIN: a binary to put in it (default: a release build).
image-check:
	scripts/install-deps.sh image
	RESERVOIR_BIN=$(RESERVOIR_BIN) scripts/check-dockerfile.sh

## The end-to-end test: a real single-node Kubernetes 1.20 (built once per machine from
## Debian's source package and cached in /var/cache/reservoir-e2e), the image, the shipped
## manifests, and pods reading datasets from a real NFS server. Root. RESERVOIR_BIN: the binary
## for the image (default: a release build; `make test` uses the debug build it already has).
e2e:
	scripts/install-deps.sh e2e
	$(CARGO) build --locked --tests
	RESERVOIR_BIN=$(RESERVOIR_BIN) scripts/image.sh archive > /dev/null
	k8s=$$(e2e/k8s/build.sh | tail -1) && \
	  RESERVOIR_K8S_BIN=$$k8s RESERVOIR_IMAGE_ARCHIVE=$$(ls target/image/reservoir-*.oci.tar) \
	  $(CARGO) test --locked --test e2e_kubernetes -- --ignored --nocapture

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

## Crash recovery under load: 50 kill -9 of the daemon at random moments under 8 readers that
## check every byte; prints the readers' worst stall and the time from a kill to the first
## answer (p50/p99), the figures in docs/benchmarks.md.
crash-stress:
	scripts/install-deps.sh test
	RECOVERY_KILLS=50 $(CARGO) test --locked --test recovery kill_9 -- --nocapture

## A new daemon takes over an older one's state: the session state of every released format
## (tests/fixtures/state), and a live hand-over from PREVIOUS (another build's binary, if given)
## to this build and back.
upgrade-check:
	scripts/install-deps.sh test
	$(CARGO) test --locked --lib every_released_state_format_is_read
	RESERVOIR_PREVIOUS_BIN=$(PREVIOUS) $(CARGO) test --locked --test recovery planned_hand_overs -- --nocapture

## The reference model of the file-system core and the path properties, long: MODEL_CASES
## random operation sequences (5,000 by default) instead of the 256 of `cargo test`; a failure
## prints its seed (RESERVOIR_MODEL_SEED replays it) and the shrunk sequence. docs/robustness.md.
MODEL_CASES ?= 5000
model:
	RESERVOIR_MODEL_CASES=$(MODEL_CASES) $(CARGO) test --locked --lib -- model_tests --nocapture
	RESERVOIR_MODEL_CASES=$(MODEL_CASES) $(CARGO) test --locked --test source_paths -- --nocapture
	RESERVOIR_MODEL_CASES=$(MODEL_CASES) $(CARGO) test --locked --test nfs_source -- nfs_paths --nocapture

## The fuzz targets of fuzz/ (cargo-fuzz on the nightly toolchain; cargo-fuzz is installed if
## missing): every target for FUZZ_SMOKE_SECONDS (part of `make test`), or FUZZ_SECONDS each
## (`make fuzz`). A crash fails the run and leaves its input under fuzz/artifacts/TARGET/.
## FUZZ_TARGETS: a subset. docs/robustness.md.
FUZZ_SMOKE_SECONDS ?= 10
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?=
fuzz-smoke:
	scripts/fuzz.sh $(FUZZ_SMOKE_SECONDS) $(FUZZ_TARGETS)

fuzz:
	scripts/fuzz.sh $(FUZZ_SECONDS) $(FUZZ_TARGETS)

clean:
	$(CARGO) clean
