#!/usr/bin/env bash
# Install the Debian packages the integration tests use (Open MPI; SLURM comes with local-cluster.sh),
# when this machine allows it (root + apt-get). Idempotent: installs nothing when all are present.
set -euo pipefail
packages=(openmpi-bin libopenmpi-dev)
missing=()
for p in "${packages[@]}"; do
  # "install ok installed" only: a removed package keeps its config files and `dpkg -s` still succeeds
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-packages: missing ${missing[*]}, and this is not root with apt-get: MPI tests will be skipped" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
echo "system-packages: installed ${missing[*]}"
