#!/usr/bin/env bash
# Install Debian packages the launch tests need, only those missing: `apt-get update` once, then
# `apt-get install -y --no-install-recommends`. Idempotent; run as root (CI and the dev machines are root).
#   tests/cluster/install_packages.sh slurm      # slurmctld, slurmd, client tools, munge
#   tests/cluster/install_packages.sh openmpi    # openmpi-bin, libopenmpi-dev (mpi4py builds against it)
set -euo pipefail

declare -A SETS=(
  [slurm]="slurm-wlm slurmctld slurmd slurm-client munge"
  [openmpi]="openmpi-bin libopenmpi-dev"
)
wanted=()
for set in "$@"; do
  [[ -n ${SETS[$set]:-} ]] || { echo "install_packages.sh: unknown set '$set' (slurm, openmpi)" >&2; exit 2; }
  read -ra pkgs <<< "${SETS[$set]}"
  wanted+=("${pkgs[@]}")
done

missing=()
for p in "${wanted[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[[ ${#missing[@]} -eq 0 ]] && exit 0

command -v apt-get >/dev/null || { echo "install_packages.sh: no apt-get here; install ${missing[*]} by hand" >&2; exit 3; }
[[ $(id -u) -eq 0 ]] || { echo "install_packages.sh: must run as root to install ${missing[*]}" >&2; exit 3; }
# Another apt run (a parallel test session) holds dpkg's lock: wait for it instead of failing.
export DEBIAN_FRONTEND=noninteractive
apt_opts=(-q -o DPkg::Lock::Timeout=300)
echo "install_packages.sh: installing ${missing[*]}" >&2
start=$SECONDS
apt-get "${apt_opts[@]}" update >&2
apt-get "${apt_opts[@]}" install -y --no-install-recommends "${missing[@]}" >&2
echo "install_packages.sh: installed in $((SECONDS - start)) s" >&2
