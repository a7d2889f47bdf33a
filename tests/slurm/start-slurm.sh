#!/usr/bin/env bash
# Start a real one-node SLURM (munged, slurmctld, slurmd) by hand, no systemd.
#
# Installs Debian's slurm-wlm and munge when missing.  The node offers the
# machine's CPUs, a share of its memory and one fake GPU (gres "gpu" backed
# by /dev/null), so `--gres=gpu:1` jobs schedule on a CPU-only machine.
# State lives in $SLURM_TEST_DIR (default /tmp/slide2vec-slurm) and is wiped
# at every start: a DRAIN/INVAL reason saved there would survive a restart.
# Writes /etc/slurm/slurm.conf, so plain `sbatch`/`squeue` (and
# dask-jobqueue) find the cluster.  Needs root.
set -euo pipefail

DIR=${SLURM_TEST_DIR:-/tmp/slide2vec-slurm}
NODE=s2vnode
HERE=$(cd "$(dirname "$0")" && pwd)

if [ "$(id -u)" != 0 ]; then
    echo "start-slurm.sh: needs root (it writes /etc/slurm and starts daemons)" >&2
    exit 1
fi

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q slurm-wlm munge >/dev/null 2>&1 || {
        apt-get update -q >/dev/null
        apt-get install -y -q slurm-wlm munge >/dev/null
    }
fi

"$HERE/stop-slurm.sh" >/dev/null 2>&1 || true
rm -rf "$DIR"
mkdir -p "$DIR/state" "$DIR/spool" /etc/slurm /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key 2>/dev/null
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
fi

CPUS=$(nproc)
[ "$CPUS" -lt 2 ] && CPUS=2
MEM_MB=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 3 / 4 ))

cat > /etc/slurm/slurm.conf <<CONF
# Written by tests/slurm/start-slurm.sh: a one-node test cluster.
ClusterName=slide2vec-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
GresTypes=gpu
DefMemPerCPU=1024
KillWait=5
MinJobAge=60
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$(hostname) CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
CONF
# A count-only gres makes the node INVAL; a device file (any) makes it schedulable.
echo "NodeName=$NODE Name=gpu File=/dev/null" > /etc/slurm/gres.conf

runuser -u munge -- /usr/sbin/munged --force 2>/dev/null || /usr/sbin/munged --force
slurmctld -c
slurmd -N "$NODE"

for _ in $(seq 1 60); do
    if sinfo -h -n "$NODE" -o %T 2>/dev/null | grep -Eq '^(idle|mixed|allocated)'; then
        echo "slurm up: node $NODE ($CPUS CPUs, ${MEM_MB} MB, gres gpu:1), state in $DIR"
        exit 0
    fi
    sleep 0.5
done
echo "start-slurm.sh: node $NODE did not become idle:" >&2
sinfo -N -l >&2 || true
tail -n 20 "$DIR/slurmctld.log" "$DIR/slurmd.log" >&2 || true
exit 1
