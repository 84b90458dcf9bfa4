#!/usr/bin/env bash
# Make sure OpenMPI is here (mpirun, and the headers and mpicc a source build of mpi4py needs) and that mpirun
# can start 2 ranks on this machine. Installs openmpi-bin + libopenmpi-dev if missing. Prints mpirun's path.
# --allow-run-as-root: CI runs as root; --oversubscribe: 2 ranks even where OpenMPI counts fewer slots.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
"$HERE/install_packages.sh" openmpi
for tool in mpirun mpicc; do
  command -v "$tool" >/dev/null || { echo "check_openmpi.sh: $tool missing after install" >&2; exit 1; }
done
# shellcheck disable=SC2016
ranks=$(timeout 60 mpirun --allow-run-as-root --oversubscribe -np 2 sh -c 'echo "$OMPI_COMM_WORLD_RANK"' | sort | tr '\n' ' ')
[[ $ranks == "0 1 " ]] || { echo "check_openmpi.sh: mpirun -np 2 started ranks '$ranks', expected '0 1 '" >&2; exit 1; }
command -v mpirun
