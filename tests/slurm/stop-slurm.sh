#!/usr/bin/env bash
# Stop what start-slurm.sh started: cancel jobs, then slurmd, slurmctld, munged.
# Waits for the processes to be gone (pgrep ignores zombies; `kill -0` does not).
set -u

scancel --user=root >/dev/null 2>&1 || true
for daemon in slurmd slurmctld munged; do
    pkill -x "$daemon" 2>/dev/null || true
done
for _ in $(seq 1 40); do
    alive=$(ps -eo stat=,comm= | awk '$1 !~ /^Z/ && ($2=="slurmd" || $2=="slurmctld" || $2=="munged")' | wc -l)
    [ "$alive" -eq 0 ] && exit 0
    sleep 0.25
done
for daemon in slurmd slurmctld munged; do
    pkill -9 -x "$daemon" 2>/dev/null || true
done
exit 0
