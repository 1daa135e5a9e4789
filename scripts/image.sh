#!/usr/bin/env bash
# Builds the image deploy/kubernetes/ names (ghcr.io/reservoir-csi/reservoir:VERSION) on a
# machine with no Docker daemon and no registry: the release binary and the shared libraries it
# links, nothing else (no shell, no package manager), as an OCI image archive.
#
# Usage: scripts/image.sh [rootfs|archive|import]
#   rootfs   stage the image's files in $IMAGE_DIR/rootfs (the context of ./Dockerfile:
#            `docker build -f Dockerfile -t REGISTRY/reservoir:VERSION target/image/rootfs`)
#   archive  and write $IMAGE_DIR/reservoir-VERSION.oci.tar (scripts/oci-image.py)
#   import   and load it into containerd's k8s.io namespace (the default): kubelet on this
#            machine can then run the manifests with imagePullPolicy IfNotPresent or Never.
# Environment: RESERVOIR_BIN (a built binary; default: cargo build --release), IMAGE_DIR
# (default target/image), CONTAINERD_ADDRESS (default /run/containerd/containerd.sock).
# The last line of stdout is the image reference.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-import}
case "$mode" in rootfs|archive|import) ;; *) echo "usage: $0 [rootfs|archive|import]" >&2; exit 2 ;; esac
image_dir=${IMAGE_DIR:-target/image}
address=${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
repository=ghcr.io/reservoir-csi/reservoir
ref="$repository:$version"
# The manifests must name the image this builds: a release that forgets to bump them fails here.
named=$(grep -ho "image: $repository:[^ ]*" deploy/kubernetes/*.yaml | sort -u | sed 's/^image: //')
if [ "$named" != "$ref" ]; then
  echo "image: deploy/kubernetes/ names '${named//$'\n'/, }' but Cargo.toml's version makes $ref" >&2
  exit 1
fi
tag=$(sed -n 's/^ *newTag: *//p' deploy/kubernetes/kustomization.yaml)
if [ "$tag" != "$version" ]; then
  echo "image: deploy/kubernetes/kustomization.yaml sets tag '$tag' but Cargo.toml's version is $version" >&2
  exit 1
fi

bin=${RESERVOIR_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked --bin reservoir >&2
  bin=target/release/reservoir
fi
[ -x "$bin" ] || { echo "image: $bin is not an executable" >&2; exit 1; }

rootfs="$image_dir/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs/usr/bin" "$rootfs/tmp" "$rootfs/etc"
chmod 1777 "$rootfs/tmp"
# Debug sections stay in target/; the image gets the code (about a third of the size).
strip --strip-debug -o "$rootfs/usr/bin/reservoir" "$bin"
# Each library at the path the dynamic loader looks for it (the loader's own absolute path
# included), as a regular file: a scratch image has no /usr merge symlinks to follow.
while read -r lib; do
  mkdir -p "$rootfs$(dirname "$lib")"
  cp -L "$lib" "$rootfs$lib"
done < <(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
# Names for the uids a pod may run as (tools print them; nothing depends on them).
printf 'root:x:0:0:root:/:/usr/bin/reservoir\nnobody:x:65534:65534:nobody:/:/usr/bin/reservoir\n' \
  > "$rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$rootfs/etc/group"
# The image must run with nothing but these files.
chroot "$rootfs" /usr/bin/reservoir --version >/dev/null ||
  { echo "image: the staged binary does not run inside $rootfs" >&2; exit 1; }
echo "image: staged $rootfs ($(du -sm "$rootfs" | cut -f1) MiB)" >&2
[ "$mode" = rootfs ] && { echo "$ref"; exit 0; }

archive="$image_dir/reservoir-$version.oci.tar"
created=$(git log -1 --format=%cd --date=format-local:%Y-%m-%dT%H:%M:%SZ 2>/dev/null || echo 1970-01-01T00:00:00Z)
TZ=UTC python3 scripts/oci-image.py "$rootfs" "$archive" --ref "$ref" \
  --entrypoint /usr/bin/reservoir --created "$created" >&2
[ "$mode" = archive ] && { echo "$ref"; exit 0; }

if ! ctr --address "$address" version >/dev/null 2>&1; then
  echo "image: no containerd answers on $address; import $archive yourself:" >&2
  echo "  ctr -n k8s.io images import $archive" >&2
  exit 1
fi
ctr --address "$address" -n k8s.io images import "$archive" >&2
echo "image: imported $ref into containerd ($address, namespace k8s.io)" >&2
echo "$ref"
