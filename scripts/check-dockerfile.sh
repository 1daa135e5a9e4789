#!/usr/bin/env bash
# Builds ./Dockerfile with buildah (from Debian: no daemon, no registry) from the tree
# `scripts/image.sh rootfs` stages, and checks that the image holds exactly that tree, runs,
# and has the entrypoint the manifests rely on: the Dockerfile users build cannot drift from
# the image `make image` makes. Uses a private buildah store, removed at the end.
# Environment: RESERVOIR_BIN (a built binary; default: cargo build --release).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/image.sh rootfs >/dev/null
rootfs=${IMAGE_DIR:-target/image}/rootfs
store=$(mktemp -d /var/tmp/reservoir-buildah.XXXXXX)
b=(buildah --root "$store/root" --runroot "$store/run" --storage-driver vfs)
container=
# buildah keeps a blob-info cache in /var/lib/containers/cache whatever --root says.
containers_dir_existed=$([ -e /var/lib/containers ] && echo yes || echo no)
cleanup() {
  if [ -n "$container" ]; then
    "${b[@]}" umount "$container" >/dev/null 2>&1 || true
    "${b[@]}" rm "$container" >/dev/null 2>&1 || true
  fi
  "${b[@]}" rmi --all --force >/dev/null 2>&1 || true
  grep -o " $store/[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
  rm -rf "$store"
  [ "$containers_dir_existed" = yes ] || rm -rf /var/lib/containers
}
trap cleanup EXIT

image=localhost/reservoir-dockerfile-check:latest
"${b[@]}" bud --quiet -f Dockerfile -t "$image" "$rootfs" >/dev/null
entrypoint=$("${b[@]}" inspect --type image "$image" | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)["OCIv1"]["config"]["Entrypoint"], separators=(",", ":")))')
[ "$entrypoint" = '["/usr/bin/reservoir"]' ] ||
  { echo "check-dockerfile: entrypoint is $entrypoint, not [\"/usr/bin/reservoir\"]" >&2; exit 1; }
container=$("${b[@]}" from --quiet "$image")
mnt=$("${b[@]}" mount "$container")
# The same files, modes and contents as the staged tree.
if ! diff -r --no-dereference "$rootfs" "$mnt" >&2; then
  echo "check-dockerfile: the Dockerfile's image differs from $rootfs" >&2; exit 1
fi
(cd "$rootfs" && find . -mindepth 1 -printf '%p %m %y\n' | sort) > "$store/staged"
(cd "$mnt" && find . -mindepth 1 -printf '%p %m %y\n' | sort) > "$store/built"
diff "$store/staged" "$store/built" >&2 ||
  { echo "check-dockerfile: modes or file types differ" >&2; exit 1; }
version=$(chroot "$mnt" /usr/bin/reservoir --version)
echo "check-dockerfile: Dockerfile builds with buildah: $version, entrypoint $entrypoint"
