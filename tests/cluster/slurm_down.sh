#!/usr/bin/env bash
# Stop the test cluster started by slurm_up.sh (munged stays: other munge users may need it).
set -euo pipefail
DIR=${MEGADISTIL_SLURM_DIR:-/var/tmp/megadistil-slurm}
for d in slurmd slurmctld; do
  pid_file=$DIR/$d.pid
  if [[ -s $pid_file ]] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then kill "$(cat "$pid_file")"; fi
done
