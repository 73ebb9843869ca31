#!/usr/bin/env bash
# Installs what scripts/container-smoke.sh needs on a Debian bookworm CI machine:
# podman (with runc, see docs/container.md), debootstrap for the local base images,
# podman-compose / docker-compose for the compose file, curl and jq for the API checks.
set -euo pipefail

pkgs=(podman runc debootstrap podman-compose docker-compose curl jq)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ "${#missing[@]}" -eq 0 ]; then
  echo "ci-setup-containers: all packages present"
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
$sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq "${missing[@]}"
