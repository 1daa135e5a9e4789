#!/usr/bin/env bash
# Runs the Kubernetes CSI conformance tool csi-sanity against `reservoir csi` (Identity,
# Controller and Node on one socket). csi-sanity is not packaged for Debian: point CSI_SANITY at
# a binary (https://github.com/kubernetes-csi/csi-test, `go install
# github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity@latest`) or put it on PATH. Without it
# the script says SKIPPED and exits 77, so `make sanity` fails rather than passing silently.
set -euo pipefail
cd "$(dirname "$0")/.."

# Exit status 77 (the automake convention for "skipped") when the tool is missing: a run that
# tested nothing must never look like a pass to make, CI or a person reading only the status.
readonly SKIPPED=77
sanity=${CSI_SANITY:-$(command -v csi-sanity || true)}
if [ -z "$sanity" ] || [ ! -x "$sanity" ]; then
  {
    echo "################################################################################"
    echo "## csi-sanity: SKIPPED -- NOTHING WAS TESTED"
    echo "## no csi-sanity binary: set CSI_SANITY=/path/to/csi-sanity or put it on PATH"
    echo "## (exit status $SKIPPED: a skip, never a pass)"
    echo "################################################################################"
  } >&2
  exit "$SKIPPED"
fi
[ "$(id -u)" -eq 0 ] || { echo "csi-sanity: run as root (the node service mounts)" >&2; exit 1; }
bin=${RESERVOIR:-target/release/reservoir}
[ -x "$bin" ] || { echo "csi-sanity: $bin is missing; run 'make release'" >&2; exit 1; }

work=/tmp/reservoir-sanity
rm -rf "$work"
mkdir -p "$work/data" "$work/state" "$work/cache"
echo "a file in the dataset" > "$work/data/hello.txt"
pid=
cleanup() {
  [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true
  # The daemon `reservoir csi` started outlives it (its own session): stop it by its pid.
  dpid=$("$bin" status --socket "$work/daemon.sock" --json 2>/dev/null | grep -o '"pid": *[0-9]*' | head -1 | grep -o '[0-9]*$' || true)
  if [ -n "$dpid" ]; then
    kill -TERM "$dpid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$dpid" 2>/dev/null || break; sleep 0.1; done
  fi
  grep -o " $work/[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
}
trap cleanup EXIT INT TERM

"$bin" csi --endpoint "unix://$work/csi.sock" --node-id sanity-node --state-dir "$work/state" \
  --daemon-socket "$work/daemon.sock" --cache-dir "$work/cache" --cache-size 1Gi \
  --daemon-log "$work/daemon.log" --allowed-sources "$work/data" 2> "$work/csi.log" &
pid=$!
for _ in $(seq 1 100); do [ -S "$work/csi.sock" ] && break; sleep 0.1; done

"$sanity" \
  --csi.endpoint "$work/csi.sock" \
  --csi.testvolumeparameters csi-sanity/parameters.yaml \
  --csi.mountdir "$work/target" \
  --csi.stagingdir "$work/staging" \
  --csi.testvolumesize 67108864 \
  "$@"
