#!/usr/bin/env bash
# Runs every fuzz target of fuzz/ for SECONDS each (docs/robustness.md): one build for all of
# them, then each target from its committed seeds (fuzz/corpus/TARGET) plus what earlier runs
# on this machine found (fuzz/target/corpus/TARGET, not committed). Fails on the first crash,
# leaving the input under fuzz/artifacts/TARGET/ and the command that replays it in the log.
# Usage: scripts/fuzz.sh SECONDS [TARGET...]   (env: FUZZ_SANITIZER, default none)
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=${1:?usage: $0 SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(csi_requests source_spec control_request cache_files nfs_replies)
# No sanitizer by default: the code these targets reach is safe Rust, where AddressSanitizer
# finds nothing the Rust checks do not, and it doubles the build and slows every input.
# Overflow checks and debug assertions are on (fuzz/Cargo.toml's release profile, and -a).
sanitizer=${FUZZ_SANITIZER:-none}
CARGO_FUZZ_VERSION=0.13.1

if ! rustup toolchain list | grep -q '^nightly'; then
  echo "fuzz: the nightly Rust toolchain is missing (cargo fuzz needs it): rustup toolchain install nightly" >&2
  exit 1
fi
if [ "$(cargo fuzz --version 2>/dev/null)" != "cargo-fuzz $CARGO_FUZZ_VERSION" ]; then
  echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION"
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

flags=(--sanitizer "$sanitizer" --debug-assertions)
cargo +nightly fuzz build "${flags[@]}"

summary=()
for target in "${targets[@]}"; do
  found=fuzz/target/corpus/$target
  mkdir -p "$found" "fuzz/artifacts/$target"
  log=fuzz/target/$target.log
  echo "fuzz: $target for ${seconds}s"
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: 2 GiB is an out-of-memory.
  if ! cargo +nightly fuzz run "${flags[@]}" "$target" "$found" "fuzz/corpus/$target" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
      >"$log" 2>&1; then
    tail -40 "$log" >&2
    echo "fuzz: $target FAILED; the input is in fuzz/artifacts/$target/, replay it with:" >&2
    echo "  cargo +nightly fuzz run ${flags[*]} $target fuzz/artifacts/$target/<file>" >&2
    exit 1
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  summary+=("$target: ${execs:-?} inputs in ${seconds}s, no crash")
done
printf 'fuzz: %s\n' "${summary[@]}"
