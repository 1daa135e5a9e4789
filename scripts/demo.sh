#!/usr/bin/env bash
# The main job on an embedded default: a sample dataset mounted through the cache, read cold
# and warm, and the mount's status. Usage: scripts/demo.sh [SOURCE]
# Without SOURCE, a sample dataset is generated in a temporary directory and used as the source.
set -euo pipefail

bin=${RESERVOIR:-target/release/reservoir}
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (FUSE mounts with allow_other and passthrough need it)" >&2; exit 1; }
[ -x "$bin" ] || { echo "demo: $bin is missing; run 'make demo'" >&2; exit 1; }

work=$(mktemp -d /tmp/reservoir-demo.XXXXXX)
mnt=$work/mnt
pid=
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
  fi
  mountpoint -q "$mnt" 2>/dev/null && umount -l "$mnt"
  rm -rf "$work"
}
trap cleanup EXIT INT TERM
mkdir -p "$mnt"
export RESERVOIR_RUN_DIR=$work/run

source=${1:-}
if [ -z "$source" ]; then
  source=$work/dataset
  echo "== creating a sample dataset in $source: 2,000 small files and one 256 MiB file"
  python3 - "$source" <<'PY'
import os, random, sys
root = sys.argv[1]
rng = random.Random(42)
for i in range(2000):
    d = os.path.join(root, "train", f"class{i % 20:02d}")
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, f"img{i:05d}.jpg"), "wb") as f:
        f.write(rng.randbytes(rng.randint(4 << 10, 64 << 10)))
with open(os.path.join(root, "corpus.bin"), "wb") as f:
    for _ in range(256):
        f.write(rng.randbytes(1 << 20))
PY
fi

echo "== mounting $source at $mnt (cache in $work/cache)"
"$bin" mount "$source" "$mnt" --cache-dir "$work/cache" --cache-size 2Gi --metadata-ttl forever \
  2> "$work/mount.log" &
pid=$!
for _ in $(seq 1 200); do
  mountpoint -q "$mnt" && [ -n "$(ls -A "$RESERVOIR_RUN_DIR" 2>/dev/null)" ] && break
  kill -0 "$pid" 2>/dev/null || { cat "$work/mount.log" >&2; exit 1; }
  sleep 0.05
done

read_all() {
  local start end
  sync; echo 3 > /proc/sys/vm/drop_caches
  start=$(date +%s.%N)
  find "$mnt" -type f -print0 | xargs -0 -P 8 -n 64 cat > /dev/null
  end=$(date +%s.%N)
  python3 -c "print(f'{$end - $start:.2f} s')"
}

files=$(find "$mnt" -type f | wc -l)
bytes=$(du -sb --apparent-size "$mnt" | cut -f1)
echo "== dataset: $files files, $((bytes >> 20)) MiB"
echo "== cold read (everything comes from the source): $(read_all)"
echo "== warm read (everything comes from the cache, page cache dropped): $(read_all)"
echo
"$bin" status "$mnt"
