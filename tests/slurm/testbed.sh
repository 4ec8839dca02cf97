#!/usr/bin/env bash
# A throw-away Slurm (munged + slurmctld + slurmd, optional slurmdbd) for the integration tests: one node, or
# two nodes on this one machine (NODES=2).
#
#   bash tests/slurm/testbed.sh up       # install if missing (root), start; prints `export SLURM_CONF=...`
#   bash tests/slurm/testbed.sh status   # daemons, partitions, queue
#   bash tests/slurm/testbed.sh down     # cancel every job, stop the daemons by their recorded PIDs
#   eval "$(bash tests/slurm/testbed.sh up)"; sbatch ...; bash tests/slurm/testbed.sh down
#   NODES=2 bash tests/slurm/testbed.sh up|status|down   # the two-node cluster (a box of its own, .slurm-2nodes)
#   NODES=2 bash tests/slurm/testbed.sh freeze tn2       # tn2 stops answering (SIGSTOP to all it runs): lost node
#   NODES=2 bash tests/slurm/testbed.sh reboot tn2       # power-cycle tn2: kill all it runs, start its slurmd
#
# Two nodes (NODES=2; root; /work/shared/notes/two-node-testbed.md has the measurements): nodes tn1 and tn2 and
# the controller tnctl, each daemon in its own UTS namespace (`unshare --uts`) so that gethostname() is its node
# name, which is how slurmd finds its node; the tasks it starts inherit that hostname. Each has its own loopback
# address, added to /etc/hosts on `up` (lines tagged with the box) and removed on `down`. The ports (controller,
# two slurmd, srun's range) are picked free at start, so this cluster runs beside the single-node one.
# SlurmdTimeout is short (SLURMD_TIMEOUT, 10 s) so that a stopped node is declared DOWN within seconds.
#
# No systemd, no cgroups, no DNS. Everything lives under $SLURM_BOX (default: <repo>/.slurm, gitignored):
# etc/ (slurm.conf, munge.key), run/ (socket, pid files), log/, state/, spool/. `up` wipes state, so job ids
# restart at FIRST_JOB_ID: give each test session a fresh output folder.
#
# Partitions: `low` (default, preemptable: PreemptMode=REQUEUE, GraceTime) and `high` (PriorityTier 10).
# Four settings make preemption/requeue tests take seconds instead of minutes and keep checkpoints
# (see /work/shared/notes/slurm-testbed.md):
#   cred_expire=5                  a requeued job is held cred_expire+1 s (Slurm's default holds it 121 s)
#   preempt_send_user_signal       the job's --signal is also sent at preemption, not only near the time limit
#   GraceTime>0 on `low`           time to save between the preemption signal and SIGKILL
#   bf_interval=1,sched_interval=2 requeued/eligible jobs and preemptors start within about a second
#
# Knobs (environment): NODES(1|2), SLURM_BOX, SLURM_NODE, CRED_EXPIRE(5), GRACE_TIME(10), KILL_WAIT(5),
#   SCHED_PARAMS(bf_interval=1,sched_interval=2), SLURMCTLD_PARAMS(preempt_send_user_signal; set it empty to
#   model a cluster that sends only SIGTERM at preemption), SLURMCTLD_PORT(6817), SLURMD_PORT(6818),
#   FIRST_JOB_ID(1), ACCOUNTING(0; 1 = MariaDB + slurmdbd for a real sacct), SLURMDBD_PORT(6819), MYSQL_PORT(3307),
#   SLURMD_TIMEOUT(60; 10 with NODES=2).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
NODES=${NODES:-1}
case "$NODES" in
  1) SUFFIX="" ;;
  2) SUFFIX=-2nodes ;;
  *) echo "testbed: NODES must be 1 or 2 (got '$NODES')" >&2; exit 2 ;;
esac
C=${SLURM_BOX:-$REPO/.slurm$SUFFIX}
# munged refuses a socket under any folder that is not world-executable (a checkout in `mktemp -d` is 0700):
# then the box moves to a folder of its own under /tmp.
if [ -z "${SLURM_BOX:-}" ]; then
  d=$REPO
  while [ "$d" != / ]; do
    if [ "$(( 0$(stat -c %a "$d") % 10 & 1 ))" = 0 ]; then
      C=/tmp/t2v-slurm-$(id -u)-$(printf %s "$REPO" | cksum | cut -d' ' -f1)$SUFFIX; break
    fi
    d=$(dirname "$d")
  done
fi
export SLURM_CONF=$C/etc/slurm.conf
HOST=${SLURM_NODE:-$(hostname -s)}
CRED_EXPIRE=${CRED_EXPIRE:-5}
GRACE=${GRACE_TIME:-10}
KILLWAIT=${KILL_WAIT:-5}
SCHED_PARAMS=${SCHED_PARAMS:-bf_interval=1,sched_interval=2}
CTLD_PARAMS=${SLURMCTLD_PARAMS-preempt_send_user_signal}
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
FIRST_JOB_ID=${FIRST_JOB_ID:-1}
ACCOUNTING=${ACCOUNTING:-0}
DBD_PORT=${SLURMDBD_PORT:-6819}
MYSQL_PORT=${MYSQL_PORT:-3307}
# The two-node cluster's names and loopback addresses (NODES=2).
TN_CTL=tnctl TN_CTL_ADDR=127.0.0.10
TN_NODES=(tn1 tn2) TN_ADDRS=(127.0.0.11 127.0.0.12)
HOSTS_TAG="# t2v-testbed $C"
if [ "$NODES" = 2 ]; then SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-10}; else SLURMD_TIMEOUT=${SLURMD_TIMEOUT:-60}; fi

say() { echo "testbed: $*" >&2; }
die() { say "$*"; exit 1; }
alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
slurmd_pidfiles() { if [ "$NODES" = 2 ]; then echo "$C/run/slurmd-tn1.fgpid $C/run/slurmd-tn2.fgpid"; else echo "$C/run/slurmd.fgpid"; fi; }
running() {
  local f
  for f in "$C/run/slurmctld.fgpid" $(slurmd_pidfiles) "$C/run/munged.pid"; do alive "$f" && return 0; done
  return 1
}

install_if_missing() {
  local need=(slurmctld slurmd sbatch munged mungekey)
  [ "$ACCOUNTING" = 1 ] && need+=(slurmdbd mariadbd)
  local missing=0 c
  for c in "${need[@]}"; do command -v "$c" >/dev/null || missing=1; done
  [ $missing = 0 ] && return 0
  [ "$(id -u)" = 0 ] || die "Slurm is not installed and we are not root: apt-get install slurmctld slurmd slurm-client munge"
  local pkgs=(slurmctld slurmd slurm-client munge)
  [ "$ACCOUNTING" = 1 ] && pkgs+=(slurmdbd mariadb-server)
  say "installing ${pkgs[*]} (apt, --no-install-recommends)"
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >&2
}

write_conf() {
  local acct nodes node_lines ctl_host ports per_node=""
  if [ "$ACCOUNTING" = 1 ]; then
    acct="JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$C/run/munge.socket"
  else
    acct="JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none"
  fi
  if [ "$NODES" = 2 ]; then
    # One line per node, each with its own address, hostname and port; `%n` gives every slurmd its own files.
    # Two CPUs each (CR_CPU): 4 claimed on 2 real cores, so two-node jobs stay tiny.
    ctl_host="$TN_CTL($TN_CTL_ADDR)"
    ports="SlurmctldPort=$CTLD_PORT
SrunPortRange=$SRUN_PORTS
CommunicationParameters=NoCtldInAddrAny"
    per_node="%n"
    node_lines="NodeName=tn1 NodeAddr=${TN_ADDRS[0]} NodeHostname=tn1 Port=$TN1_PORT CPUs=2 State=UNKNOWN
NodeName=tn2 NodeAddr=${TN_ADDRS[1]} NodeHostname=tn2 Port=$TN2_PORT CPUs=2 State=UNKNOWN"
    nodes="tn[1-2]"
    select="CR_CPU"
  else
    ctl_host="localhost(127.0.0.1)"
    ports="SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT"
    # The node line from the real hardware (CPUs, cores, memory), renamed so any hostname works.
    node_lines="$(slurmd -C | head -1 | sed "s/^NodeName=[^ ]*/NodeName=$HOST/") NodeAddr=127.0.0.1 State=UNKNOWN"
    nodes=$HOST
    select="CR_Core"
  fi
  cat > "$SLURM_CONF" <<CONF
# Generated by tests/slurm/testbed.sh; rewritten on every \`up\`.
ClusterName=testcluster
SlurmctldHost=$ctl_host
$ports
SlurmUser=$(id -un)
SlurmdUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$C/run/munge.socket,cred_expire=$CRED_EXPIRE
StateSaveLocation=$C/state
SlurmdSpoolDir=$C/spool${per_node:+/$per_node}
SlurmctldPidFile=$C/run/slurmctld.pid
SlurmdPidFile=$C/run/slurmd${per_node:+-$per_node}.pid
SlurmctldLogFile=$C/log/slurmctld.log
SlurmdLogFile=$C/log/slurmd${per_node:+-$per_node}.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
$acct
JobCompType=jobcomp/filetxt
JobCompLoc=$C/log/jobcomp.txt
SelectType=select/cons_tres
SelectTypeParameters=$select
SchedulerType=sched/backfill
SchedulerParameters=$SCHED_PARAMS
PriorityType=priority/basic
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
${CTLD_PARAMS:+SlurmctldParameters=$CTLD_PARAMS}
JobRequeue=1
EnforcePartLimits=ALL
ReturnToService=2
KillWait=$KILLWAIT
MinJobAge=3600
FirstJobId=$FIRST_JOB_ID
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=$SLURMD_TIMEOUT
$node_lines
PartitionName=low  Nodes=$nodes Default=YES MaxTime=INFINITE State=UP PriorityTier=1  PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=$nodes Default=NO  MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
CONF
}

# --- two nodes: free ports, /etc/hosts, one UTS namespace per daemon ----------------------------------------

pick_ports() {  # a block of 24 free TCP ports below the jobs' MASTER_PORT range (20000+): controller, tn1, tn2, srun
  local base
  base=$(python3 - <<'PY'
import socket
for base in range(17000, 19976, 24):
    try:
        held = []
        for port in range(base, base + 24):
            s = socket.socket()
            held.append(s)
            s.bind(("0.0.0.0", port))
        print(base)
        break
    except OSError:
        pass
    finally:
        for s in held:
            s.close()
PY
)
  [ -n "$base" ] || die "no block of 24 free ports in 17000-19999"
  CTLD_PORT=$base TN1_PORT=$((base + 1)) TN2_PORT=$((base + 2)) SRUN_PORTS=$((base + 4))-$((base + 23))
}

hosts_add() {
  hosts_remove
  {
    echo "$TN_CTL_ADDR $TN_CTL $HOSTS_TAG"
    echo "${TN_ADDRS[0]} ${TN_NODES[0]} $HOSTS_TAG"
    echo "${TN_ADDRS[1]} ${TN_NODES[1]} $HOSTS_TAG"
  } >> /etc/hosts
}

hosts_remove() {  # only our own tagged lines; written in place (/etc/hosts is often a bind mount: no rename)
  local kept
  grep -qF "$HOSTS_TAG" /etc/hosts 2>/dev/null || return 0
  kept=$(grep -vF "$HOSTS_TAG" /etc/hosts || true)
  printf '%s\n' "$kept" > /etc/hosts
}

in_uts() {  # NAME CMD...: run CMD with hostname NAME, in a UTS namespace of its own
  local name=$1; shift
  unshare --uts sh -c 'hostname "$0"; exec "$@"' "$name" "$@"
}

node_state() { sinfo -h -n "$1" -o %t 2>/dev/null | head -1; }

start_accounting() {
  if [ ! -d "$C/mysql-template" ]; then  # one-off (~1.5 s), copied on later starts
    mariadb-install-db --no-defaults --user=root --datadir="$C/mysql-template" \
      --auth-root-authentication-method=normal --skip-test-db > "$C/log/mariadb-install.log" 2>&1
  fi
  cp -a "$C/mysql-template" "$C/mysql"
  setsid mariadbd --no-defaults --user=root --datadir="$C/mysql" --socket="$C/run/mysqld.sock" \
    --port="$MYSQL_PORT" --bind-address=127.0.0.1 --pid-file="$C/run/mysqld.pid" --log-error="$C/log/mysqld.err" \
    --skip-name-resolve --innodb-buffer-pool-size=64M > "$C/log/mysqld.stdout" 2>&1 < /dev/null &
  echo $! > "$C/run/mysqld.fgpid"
  local i
  for i in $(seq 200); do mariadb-admin --no-defaults -h127.0.0.1 -P"$MYSQL_PORT" -uroot ping >/dev/null 2>&1 && break; sleep 0.05; done
  cat > "$C/etc/slurmdbd.conf" <<DBD
AuthType=auth/munge
AuthInfo=socket=$C/run/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=$(id -un)
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$C/run/slurmdbd.pid
LogFile=$C/log/slurmdbd.log
DebugLevel=info
DBD
  chmod 600 "$C/etc/slurmdbd.conf"
  setsid slurmdbd -D > "$C/log/slurmdbd.stdout" 2>&1 < /dev/null &  # finds slurmdbd.conf next to $SLURM_CONF
  echo $! > "$C/run/slurmdbd.fgpid"
  for i in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.1; done
  sacctmgr -i add cluster testcluster >/dev/null || { tail "$C/log/slurmdbd.log" >&2; die "slurmdbd not reachable"; }
}

up() {
  install_if_missing
  if running; then die "already running under $C (run \`$0 down\` first, or \`$0 status\`)"; fi
  if [ "$NODES" = 2 ]; then
    [ "$(id -u)" = 0 ] || die "NODES=2 needs root (a UTS namespace per node, /etc/hosts entries)"
    command -v unshare >/dev/null || die "NODES=2 needs unshare (util-linux)"
    pick_ports
  fi
  local left
  left=$(ps -eo pid=,comm= | awk '$2=="slurmstepd"{print $1}')
  [ -z "$left" ] || say "note: slurmstepd processes are running (another cluster's jobs, or an earlier one's): $left"
  # Fresh state every time: no job, node or reservation survives from an earlier session.
  rm -rf "$C/run" "$C/log" "$C/state" "$C/spool" "$C/mysql"
  mkdir -p "$C/etc" "$C/run" "$C/log" "$C/state" "$C/spool"
  chmod 755 "$C" "$C/run"  # munged insists that every directory above its socket is world-executable
  chmod 700 "$C/etc"
  [ -f "$C/etc/munge.key" ] || mungekey --create --keyfile="$C/etc/munge.key" --bits=1024
  chmod 600 "$C/etc/munge.key"
  write_conf

  munged --socket="$C/run/munge.socket" --key-file="$C/etc/munge.key" --pid-file="$C/run/munged.pid" \
    --log-file="$C/log/munged.log" --seed-file="$C/run/munged.seed"  # daemonizes; pid in its pid file
  local i st="" n
  for i in $(seq 100); do [ -S "$C/run/munge.socket" ] && [ -s "$C/run/munged.pid" ] && break; sleep 0.05; done
  [ -S "$C/run/munge.socket" ] || die "munged did not start (see $C/log/munged.log)"

  [ "$ACCOUNTING" = 1 ] && start_accounting

  # Foreground daemons (-D), backgrounded in their own session so they outlive this script.
  if [ "$NODES" = 2 ]; then
    hosts_add
    setsid unshare --uts sh -c 'hostname "$0"; exec slurmctld -D -c -f "$1"' "$TN_CTL" "$SLURM_CONF" \
      > "$C/log/slurmctld.stdout" 2>&1 < /dev/null &
  else
    setsid slurmctld -D -c -f "$SLURM_CONF" > "$C/log/slurmctld.stdout" 2>&1 < /dev/null &
  fi
  echo $! > "$C/run/slurmctld.fgpid"
  for i in $(seq 200); do scontrol ping >/dev/null 2>&1 && break; sleep 0.05; done
  scontrol ping 2>/dev/null | grep -q UP || { tail "$C/log/slurmctld.log" >&2; die "slurmctld did not come up"; }
  if [ "$NODES" = 2 ]; then
    for n in "${TN_NODES[@]}"; do start_node "$n"; done
  else
    setsid slurmd -D -N "$HOST" -f "$SLURM_CONF" > "$C/log/slurmd.stdout" 2>&1 < /dev/null &
    echo $! > "$C/run/slurmd.fgpid"
    wait_idle "$HOST"
  fi
  if [ "$NODES" = 2 ]; then
    say "up: nodes tn1 and tn2 idle (ports $CTLD_PORT-$TN2_PORT, srun $SRUN_PORTS), partitions low (default," \
        "preemptable) and high; logs in $C/log"
  else
    say "up: node $HOST idle, partitions low (default, preemptable) and high; logs in $C/log"
  fi
  echo "export SLURM_CONF=$SLURM_CONF"
}

start_node() {  # NODE [STATES]: its slurmd, in its own UTS namespace, until the node is in one of STATES
  local n=$1
  mkdir -p "$C/spool/$n"
  setsid unshare --uts sh -c 'hostname "$0"; exec slurmd -D -f "$1"' "$n" "$SLURM_CONF" \
    > "$C/log/slurmd-$n.stdout" 2>&1 < /dev/null &
  echo $! > "$C/run/slurmd-$n.fgpid"
  wait_idle "$n" "${2:-idle}"
}

wait_idle() {  # NODE [STATES]: wait until sinfo shows the node in one of STATES (default idle)
  local i st=""
  for i in $(seq 300); do
    st=$(node_state "$1")
    case " ${2:-idle} " in *" $st "*) return 0 ;; esac
    sleep 0.1
  done
  local log=$C/log/slurmd.log
  [ "$NODES" = 2 ] && log=$C/log/slurmd-$1.log
  tail "$log" >&2 || true
  die "node $1 not in ${2:-idle} (state=$st)"
}

node_pids() {  # NODE: every process in the node's UTS namespace (its slurmd, slurmstepd and tasks)
  local f=$C/run/slurmd-$1.fgpid ns p
  alive "$f" || die "node $1 is not running (no live $f)"
  ns=$(readlink "/proc/$(cat "$f")/ns/uts")
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/ns/uts" 2>/dev/null)" = "$ns" ] && echo "${p#/proc/}"
  done
  return 0
}

freeze() {  # NODE: SIGSTOP the whole node: it stops answering, as a hung or cut-off node does
  [ "$NODES" = 2 ] || die "freeze needs NODES=2"
  local pids
  pids=$(node_pids "$1")
  kill -STOP $pids
  say "froze $1 (pids $(echo $pids))"
}

reboot_node() {  # NODE: a power cycle: SIGKILL everything on it (a frozen node too), then a fresh slurmd
  [ "$NODES" = 2 ] || die "reboot needs NODES=2"
  local pids
  pids=$(node_pids "$1")
  kill -KILL $pids 2>/dev/null || true
  for i in $(seq 100); do kill -0 $pids 2>/dev/null || break; sleep 0.05; done
  rm -rf "$C/spool/$1"
  # a job waiting for this node is given it the moment it answers, so it may come back busy, not idle
  start_node "$1" "idle mix alloc"
  say "rebooted $1: $(node_state "$1")"
}

term_and_wait() {  # pidfiles...: SIGTERM all, wait up to 15 s, SIGKILL what is left
  local f p i any pids=""
  for f in "$@"; do alive "$f" && pids="$pids $(cat "$f")"; done
  [ -z "$pids" ] && return 0
  kill -TERM $pids 2>/dev/null || true
  for i in $(seq 300); do
    any=0
    for p in $pids; do kill -0 "$p" 2>/dev/null && any=1; done
    [ $any = 0 ] && return 0
    sleep 0.05
  done
  say "WARNING: SIGKILL to$pids"
  kill -KILL $pids 2>/dev/null || true
}

down() {
  local ids i n left=""
  if alive "$C/run/slurmctld.fgpid" && scontrol ping >/dev/null 2>&1; then
    ids=$(squeue -h -o %A 2>/dev/null || true)
    if [ -n "$ids" ]; then
      scancel $ids 2>/dev/null || true
      for i in $(seq 300); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.1; done
    fi
  fi
  # a frozen node (freeze) cannot act on SIGTERM: wake it first
  if [ "$NODES" = 2 ]; then
    for n in "${TN_NODES[@]}"; do alive "$C/run/slurmd-$n.fgpid" && kill -CONT $(node_pids "$n") 2>/dev/null; done
  fi
  term_and_wait $(slurmd_pidfiles) "$C/run/slurmctld.fgpid"
  term_and_wait "$C/run/slurmdbd.fgpid"
  term_and_wait "$C/run/mysqld.fgpid" "$C/run/munged.pid"
  # slurmstepd normally exits within a second of its job; report (never kill) survivors.
  for i in $(seq 20); do
    left=$(ps -eo pid=,comm= | awk '$2=="slurmstepd"{print $1}')
    [ -z "$left" ] && break
    sleep 0.1
  done
  [ -z "$left" ] || say "WARNING: slurmstepd still running: $left"
  [ "$NODES" = 2 ] && hosts_remove
  say "down ($C)"
}

status() {
  local name
  local names=(munged slurmctld slurmd slurmdbd mysqld)
  [ "$NODES" = 2 ] && names=(munged slurmctld slurmd-tn1 slurmd-tn2)
  for name in "${names[@]}"; do
    local f=$C/run/$name.fgpid
    [ -f "$f" ] || f=$C/run/$name.pid
    if alive "$f"; then echo "$name: running (pid $(cat "$f"))"; else echo "$name: stopped"; fi
  done
  if alive "$C/run/slurmctld.fgpid"; then
    echo "export SLURM_CONF=$SLURM_CONF"
    sinfo 2>&1 || true
    squeue 2>&1 || true
  else
    return 3
  fi
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  freeze) freeze "${2:?usage: $0 freeze NODE}" ;;
  reboot) reboot_node "${2:?usage: $0 reboot NODE}" ;;
  *) echo "usage: $0 up|down|status, or with NODES=2: freeze NODE|reboot NODE" >&2; exit 2 ;;
esac
