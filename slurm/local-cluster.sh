#!/usr/bin/env bash
# A one-machine SLURM for the tests and for trying hpcvid: munged, mariadb + slurmdbd, slurmctld and three
# fake nodes (n1-n3) on this host. docs/slurm.md has the recipe and the pitfalls it avoids.
#
#   slurm/local-cluster.sh up       install Debian's packages when missing (root + apt-get), write the configs
#                                   into the state folder, start everything, wait until the nodes are idle
#   slurm/local-cluster.sh status   exit 0 when the cluster answers and its nodes are usable, 1 otherwise
#   slurm/local-cluster.sh down     stop the daemons by their PID files (never by name)
#   slurm/local-cluster.sh env      print `export SLURM_CONF=...` for a shell
#
# State (configs, database, spool, logs, PID files) lives in $HPCVID_SLURM_STATE (default /var/tmp/hpcvid-slurm),
# never in the repository. `up` is idempotent: when the cluster is already up it only says so.
# Clients find the cluster through SLURM_CONF=$STATE/etc/slurm.conf; when /etc/slurm/slurm.conf does not exist,
# `up` also links it there so that a new shell (and submitit) needs nothing exported; `down` removes that link.
set -euo pipefail

STATE=${HPCVID_SLURM_STATE:-/var/tmp/hpcvid-slurm}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
HOST=$(hostname -s)
CTLD_PORT=16817
DBD_PORT=16819
DB_PORT=16306
NODE_PORTS=17001-17003
NODES=(n1 n2 n3)
DB_PASS=hpcvid-local
PACKAGES=(munge slurmctld slurmd slurm-client slurmdbd libpmix2 mariadb-server)
export SLURM_CONF=$STATE/etc/slurm.conf
MYSQL_SOCKET=$STATE/mysql/mysqld.sock

say() { echo "local-cluster: $*" >&2; }
die() { say "$*"; exit 1; }

# ------------------------------------------------------------------------------------------ packages
install_packages() {
  local missing=() p
  for p in "${PACKAGES[@]}"; do
    # "install ok installed" only: a removed package keeps its config files and `dpkg -s` still succeeds
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "missing packages ${missing[*]}, and this is not root with apt-get: install them, or run as root"
  fi
  say "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # policy-rc.d keeps the packages from starting their own daemons where an init system exists
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# ------------------------------------------------------------------------------------------- helpers
pid_alive() {  # pid_alive FILE: the process named by the PID file runs, and it is one of our daemons
  local pid
  [ -s "$1" ] || return 1
  pid=$(cat "$1")
  kill -0 "$pid" 2>/dev/null || return 1
  # a stale file whose PID now belongs to another program must neither count as running nor be killed
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qE '(munged|mariadbd|mysqld|slurmdbd|slurmctld|slurmd)( |$)'
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: poll until COMMAND succeeds
  local seconds=$1 what=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -ge $deadline ] && die "$what did not come up within ${seconds} s (logs: $STATE/log)"
    sleep 0.5
  done
}

fill() {  # fill TEMPLATE OUTPUT: replace @NAME@ placeholders
  sed -e "s|@STATE@|$STATE|g" -e "s|@HOST@|$HOST|g" -e "s|@CTLD_PORT@|$CTLD_PORT|g" \
      -e "s|@DBD_PORT@|$DBD_PORT|g" -e "s|@DB_PORT@|$DB_PORT|g" -e "s|@NODE_PORTS@|$NODE_PORTS|g" \
      -e "s|@DB_PASS@|$DB_PASS|g" "$1" > "$2"
}

write_configs() {
  mkdir -p "$STATE"/{etc,ctld,spool,run,log,tmp,munge,mysql}
  for n in "${NODES[@]}"; do mkdir -p "$STATE/spool/$n" "$STATE/tmp/$n"; done
  fill "$HERE/slurm.conf.in" "$STATE/etc/slurm.conf"
  fill "$HERE/slurmdbd.conf.in" "$STATE/etc/slurmdbd.conf"
  chmod 600 "$STATE/etc/slurmdbd.conf"
  cp /etc/slurm/plugstack.conf "$STATE/etc/" 2>/dev/null || true
  if [ ! -e /etc/slurm/slurm.conf ] && [ "$(id -u)" = 0 ]; then
    mkdir -p /etc/slurm && ln -s "$STATE/etc/slurm.conf" /etc/slurm/slurm.conf
  fi
}

# ------------------------------------------------------------------------------------------- daemons
start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null \
      || dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 2>/dev/null
    chown munge:munge /etc/munge/munge.key && chmod 600 /etc/munge/munge.key
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge "$STATE/munge"
  chmod 755 /run/munge
  if pid_alive "$STATE/munge/munged.pid"; then return 0; fi
  # the default socket (/run/munge/munge.socket.2) is where SLURM's auth/munge looks
  runuser -u munge -- munged --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/munge/munged.log" \
    || die "munged did not start (see $STATE/munge/munged.log)"
  wait_for 20 munged bash -c 'munge -n | unmunge'
}

mysql_admin() { mariadb --no-defaults --socket="$MYSQL_SOCKET" -u root "$@"; }

start_mariadb() {
  if [ ! -d "$STATE/mysql/data/mysql" ]; then
    mkdir -p "$STATE/mysql/data" && chown -R mysql:mysql "$STATE/mysql"
    mariadb-install-db --no-defaults --user=mysql --datadir="$STATE/mysql/data" \
      --auth-root-authentication-method=socket >"$STATE/log/mariadb-install.log" 2>&1 \
      || die "mariadb-install-db failed (see $STATE/log/mariadb-install.log)"
  fi
  chown -R mysql:mysql "$STATE/mysql"
  if ! pid_alive "$STATE/mysql/mariadbd.pid"; then
    # a TCP port on the loopback only (slurmdbd connects by TCP), its own socket for the admin client
    setsid mariadbd --no-defaults --user=mysql --datadir="$STATE/mysql/data" --socket="$MYSQL_SOCKET" \
      --port=$DB_PORT --bind-address=127.0.0.1 --pid-file="$STATE/mysql/mariadbd.pid" \
      --log-error="$STATE/log/mariadbd.log" --innodb-buffer-pool-size=32M --skip-name-resolve \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadbd mysql_admin -e 'SELECT 1'
  fi
  mysql_admin -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
                  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
                  GRANT ALL ON hpcvid_acct_db.* TO 'slurm'@'127.0.0.1';
                  GRANT ALL ON hpcvid_acct_db.* TO 'slurm'@'localhost';"
}

start_slurmdbd() {
  if ! pid_alive "$STATE/run/slurmdbd.pid"; then
    slurmdbd || die "slurmdbd did not start (see $STATE/log/slurmdbd.log)"
  fi
  wait_for 60 slurmdbd sacctmgr -n list cluster
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx hpcvid; then
    sacctmgr -i add cluster hpcvid >/dev/null
  fi
}

start_slurmctld() {
  if ! pid_alive "$STATE/run/slurmctld.pid"; then
    slurmctld -f "$SLURM_CONF" || die "slurmctld did not start (see $STATE/log/slurmctld.log)"
  fi
  wait_for 60 slurmctld scontrol ping
}

start_slurmd() {
  local n
  for n in "${NODES[@]}"; do
    if ! pid_alive "$STATE/run/slurmd-$n.pid"; then
      slurmd -f "$SLURM_CONF" -N "$n" || die "slurmd $n did not start (see $STATE/log/slurmd-$n.log)"
    fi
  done
  wait_for 90 "the nodes" nodes_usable
  # nodes that were DOWN from an earlier life come back at once
  scontrol update nodename=n[1-3] state=resume >/dev/null 2>&1 || true
}

nodes_usable() {  # every node answers and is idle, mixed or allocated
  local states
  states=$(sinfo -h -N -p debug -o '%t' 2>/dev/null) || return 1
  [ "$(echo "$states" | grep -cE '^(idle|mix|alloc|comp)$')" -eq ${#NODES[@]} ]
}

# ------------------------------------------------------------------------------------------- verbs
up() {
  [ "$(id -u)" = 0 ] || die "run as root: the daemons switch users and write to /run"
  if [ -f "$SLURM_CONF" ] && status >/dev/null 2>&1; then
    say "already up ($(sinfo -h -N -p debug -o '%N=%t' | tr '\n' ' '))"
    echo "export SLURM_CONF=$SLURM_CONF"
    return 0
  fi
  install_packages
  write_configs
  start_munge
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  say "up: $(sinfo -h -N -p debug -o '%N=%t' | tr '\n' ' ')(state in $STATE)"
  echo "export SLURM_CONF=$SLURM_CONF"
}

status() {
  local f ok=0
  for f in munge/munged.pid mysql/mariadbd.pid run/slurmdbd.pid run/slurmctld.pid \
           run/slurmd-n1.pid run/slurmd-n2.pid run/slurmd-n3.pid; do
    if pid_alive "$STATE/$f"; then echo "running  $f ($(cat "$STATE/$f"))"; else echo "stopped  $f"; ok=1; fi
  done
  [ $ok = 0 ] || return 1
  timeout 10 scontrol ping >/dev/null 2>&1 || { echo "slurmctld does not answer"; return 1; }
  nodes_usable || { echo "nodes not usable: $(sinfo -h -N -o '%N=%t' 2>&1 | tr '\n' ' ')"; return 1; }
  echo "up: $(sinfo -h -N -p debug -o '%N=%t' | tr '\n' ' ')"
}

stop_pidfile() {  # stop_pidfile FILE NAME: SIGTERM, wait, then SIGKILL; only the process the file names
  local file=$1 name=$2 pid i
  pid_alive "$file" || { rm -f "$file"; return 0; }
  pid=$(cat "$file")
  kill "$pid" 2>/dev/null || true
  for i in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
  if kill -0 "$pid" 2>/dev/null; then say "$name ($pid) ignored SIGTERM: SIGKILL"; kill -9 "$pid" 2>/dev/null || true; fi
  rm -f "$file"
}

down() {
  local n
  for n in "${NODES[@]}"; do stop_pidfile "$STATE/run/slurmd-$n.pid" "slurmd $n"; done
  stop_pidfile "$STATE/run/slurmctld.pid" slurmctld
  stop_pidfile "$STATE/run/slurmdbd.pid" slurmdbd
  stop_pidfile "$STATE/mysql/mariadbd.pid" mariadbd
  stop_pidfile "$STATE/munge/munged.pid" munged
  if [ -L /etc/slurm/slurm.conf ] && [ "$(readlink /etc/slurm/slurm.conf)" = "$STATE/etc/slurm.conf" ]; then
    rm -f /etc/slurm/slurm.conf
  fi
  say "down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  env) echo "export SLURM_CONF=$SLURM_CONF" ;;
  *) echo "usage: $0 up|down|status|env" >&2; exit 2 ;;
esac
