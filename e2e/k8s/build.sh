#!/usr/bin/env bash
# Builds the Kubernetes binaries the e2e cluster runs, once per machine, and prints the directory
# that holds them (the last line of stdout; progress goes to stderr).
#
# The only Kubernetes the reachable registries offer is Debian bookworm's `kubernetes` source
# package: the upstream v1.20.2 tree with its vendor/ directory, which builds offline with
# Debian's golang-go. This script adds a deb-src entry when none is there, fetches the source
# with `apt-get source`, checks the upstream tarball against the hash pinned below (a newer
# Debian revision of the same upstream version is accepted), applies our patches and builds
# kubelet, kube-apiserver, kube-controller-manager, kube-scheduler and kube-proxy. kubectl 1.20
# comes from Debian's binary package `kubernetes-client`, unpacked next to them (not installed:
# it would clash with other kubectl packages).
#
# The result is cached in $RESERVOIR_E2E_CACHE/k8s-<key> (default /var/cache/reservoir-e2e),
# the key naming the upstream version and the hash of this recipe and its patches: only the
# first run on a machine builds (about 10-15 minutes of CPU on two cores, 1.4 GB peak memory).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

# The upstream version Debian's package carries (the "+really" names what is inside), and the
# SHA-256 of its upstream tarball, identical across Debian revisions of that upstream version.
readonly DEB_UPSTREAM=1.20.5+really1.20.2
readonly ORIG_SHA256=b83c0780efb182d928dc63d46488a847f161f04e40a94b96bf5247dd671ecdfc
readonly WHAT="cmd/kubelet cmd/kube-apiserver cmd/kube-controller-manager cmd/kube-scheduler cmd/kube-proxy"
readonly BINARIES="kubelet kube-apiserver kube-controller-manager kube-scheduler kube-proxy kubectl"
patches=("$here"/*.patch)

cache=${RESERVOIR_E2E_CACHE:-/var/cache/reservoir-e2e}
# The key: what is built, from which tarball, with which patches (not this script's wording).
recipe_hash=$( { echo "$ORIG_SHA256 $WHAT $BINARIES"; cat "${patches[@]}"; } | sha256sum | cut -c1-16)
out="$cache/k8s-1.20.2-$recipe_hash"

say() { echo "k8s-build: $*" >&2; }

have_all() {
  local b
  [ -f "$out/.complete" ] || return 1
  for b in $BINARIES; do [ -x "$out/$b" ] || return 1; done
}

if have_all; then
  say "cached: $out"
  echo "$out"
  exit 0
fi

[ "$(id -u)" -eq 0 ] || { say "run as root (installs Debian packages, writes $cache)"; exit 1; }
mkdir -p "$cache"
# One build at a time per machine; a second caller waits and then finds the cache.
exec 9> "$cache/build.lock"
flock 9
if have_all; then
  say "cached (built by another run): $out"
  echo "$out"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  say "adding a deb-src entry for Debian's source packages"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    # Same suites, URIs and keys as the binary entries, so apt sees no conflicting options.
    sed -e 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
      > /etc/apt/sources.list.d/reservoir-deb-src.sources
  elif grep -q '^deb ' /etc/apt/sources.list 2>/dev/null; then
    sed -n 's/^deb /deb-src /p' /etc/apt/sources.list > /etc/apt/sources.list.d/reservoir-deb-src.list
  else
    say "no Debian apt source found to derive a deb-src entry from"; exit 1
  fi
  apt-get update -qq
fi

need=()
for pkg in golang-go rsync dpkg-dev patch; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

work="$cache/build-$recipe_hash"
rm -rf "$work" "$out.partial"
mkdir -p "$work" "$out.partial"
trap 'rm -rf "$work" "$out.partial"' EXIT
cd "$work"
# apt drops privileges to _apt for downloads; let it write here.
chown _apt "$work" 2>/dev/null || true

say "fetching Debian's kubernetes source package"
apt-get source --download-only -qq kubernetes >/dev/null
dsc=$(ls kubernetes_*.dsc)
version=${dsc#kubernetes_}
version=${version%.dsc}
case "$version" in
  "$DEB_UPSTREAM"-*) ;;
  *) say "Debian now ships kubernetes $version, not upstream $DEB_UPSTREAM: update this script"; exit 1 ;;
esac
orig="kubernetes_$DEB_UPSTREAM.orig.tar.gz"
echo "$ORIG_SHA256  $orig" | sha256sum -c --quiet - ||
  { say "$orig does not have the pinned SHA-256 $ORIG_SHA256"; exit 1; }
# apt verified the files against the signed archive; dpkg-source would only warn that it has
# no key for the .dsc's own signature.
dpkg-source -x "$dsc" src >"$work/dpkg-source.log" 2>&1 ||
  { cat "$work/dpkg-source.log" >&2; say "cannot unpack $dsc"; exit 1; }
for p in "${patches[@]}"; do
  say "applying $(basename "$p")"
  patch -d src -p1 --quiet < "$p"
done

say "building $WHAT from kubernetes $version (about 10-15 minutes on two cores)"
start=$SECONDS
# Offline: the tree's vendor/ holds every module. nice: other work on the machine keeps its share.
(cd src && env HOME="$work/home" GOPATH="$work/gopath" GOCACHE="$work/gocache" GOFLAGS=-mod=vendor \
  GOPROXY=off CGO_ENABLED=0 nice -n 5 make WHAT="$WHAT" >"$work/build.log" 2>&1) ||
  { tail -40 "$work/build.log" >&2; say "build failed (log above)"; exit 1; }
say "built in $((SECONDS - start)) s"
for b in kubelet kube-apiserver kube-controller-manager kube-scheduler kube-proxy; do
  cp "src/_output/bin/$b" "$out.partial/$b"
done

say "unpacking kubectl from Debian's kubernetes-client package"
apt-get download -qq "kubernetes-client=$version" >/dev/null
dpkg-deb -x kubernetes-client_*.deb client
cp client/usr/bin/kubectl "$out.partial/kubectl"

{
  echo "kubernetes source package $version, upstream tarball sha256 $ORIG_SHA256"
  for p in "${patches[@]}"; do echo "patch $(basename "$p") sha256 $(sha256sum < "$p" | cut -d' ' -f1)"; done
} > "$out.partial/BUILD-INFO"
touch "$out.partial/.complete"
rm -rf "$out"
mv "$out.partial" "$out"
say "cached: $out"
echo "$out"
