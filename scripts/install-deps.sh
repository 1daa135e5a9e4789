#!/usr/bin/env bash
# Installs what building, testing and the demo need on a fresh Debian machine.
# Idempotent: a second run only checks. Usage: scripts/install-deps.sh [test|bench]
set -euo pipefail

want=(fuse3 util-linux iproute2 python3)
case "${1:-test}" in
  test)  want+=(nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils) ;;
  bench) want+=(nfs-ganesha nfs-ganesha-vfs rpcbind libnfs-utils bindfs rclone fio python3-matplotlib) ;;
  demo)  ;;
  deploy) ;;
  *) echo "usage: $0 [demo|test|bench|deploy]" >&2; exit 2 ;;
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
  # ganesha's packages try to start services; there is no systemd here, so keep them from starting.
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  rm -f /usr/sbin/policy-rc.d
fi

# Offline validation of the Kubernetes manifests.
if [ "${1:-test}" = deploy ] && ! command -v kubernetes-validate >/dev/null 2>&1; then
  echo "install-deps: installing kubernetes-validate (PyPI)"
  python3 -m pip install --quiet --disable-pip-version-check kubernetes-validate
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: cargo (Rust 1.85 or newer) is not on PATH; install it with rustup (https://rustup.rs)" >&2
  exit 1
fi
