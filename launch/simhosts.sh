#!/usr/bin/env bash
# Train across N simulated hosts on this machine: one network namespace per host, joined by veth
# (2 hosts: one cable; more: a bridge in a namespace of its own), addresses 10.77.0.1.. that exist
# only inside the namespaces. Real TCP between the hosts (UCX_TLS=tcp,self), one filesystem.
#   sudo launch/simhosts.sh N CONFIG [key=value ...]
# RANKS_PER_HOST (default 1) ranks on each host, THREADS kernel threads each (default: the cores
# divided among all ranks, since the hosts share them); RATE (e.g. 1gbit) and LATENCY (default
# 50ms) shape every host's outgoing link with tc; PREFIX names the namespaces (default dgsim<pid>).
# Everything is removed on exit, also on failure or Ctrl-C. Needs root and iproute2. The same
# topology as the tests' harness (tests/hosts.py). From another shell,
# `ip -n PREFIX-h1 link set dg0 down` pulls host 1's cable.
set -euo pipefail
usage="usage: launch/simhosts.sh N CONFIG [key=value ...]"
n=${1:?$usage}; config=${2:?$usage}
shift 2
[ "$n" -ge 2 ] || { echo "simhosts: N must be at least 2" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "simhosts: network namespaces need root" >&2; exit 2; }
per_host=${RANKS_PER_HOST:-1}
# every simulated host sees all of this machine's cores: share them out instead of auto's per-host split
cores=$(nproc)
threads=${THREADS:-$(( cores / (n * per_host) > 0 ? cores / (n * per_host) : 1 ))}
prefix=${PREFIX:-dgsim$$}
python_bin=${PYTHON:-python}
mpirun_bin="$(dirname "$(command -v "$python_bin")")/mpirun"     # the mpich wheel's, next to python
[ -x "$mpirun_bin" ] || mpirun_bin=$(command -v mpirun)
work=$(mktemp -d "/tmp/$prefix.XXXXXX")
hosts=(); for i in $(seq 0 $((n - 1))); do hosts+=("$prefix-h$i"); done
switch=""; [ "$n" -gt 2 ] && switch="$prefix-sw"

cleanup() {
  for ns in "${hosts[@]}" $switch; do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM      # until mpirun runs

for ns in "${hosts[@]}" $switch; do ip netns add "$ns"; ip -n "$ns" link set lo up; done
if [ -z "$switch" ]; then
  ip link add dg0 netns "${hosts[0]}" type veth peer name dg0 netns "${hosts[1]}"
else
  ip -n "$switch" link add br0 type bridge
  ip -n "$switch" link set br0 up
  for i in "${!hosts[@]}"; do
    ip link add dg0 netns "${hosts[$i]}" type veth peer name "port$i" netns "$switch"
    ip -n "$switch" link set "port$i" master br0
    ip -n "$switch" link set "port$i" up
  done
fi
: > "$work/hostfile"
case_lines=""
for i in "${!hosts[@]}"; do
  ns=${hosts[$i]}; ip=10.77.0.$((i + 1))
  ip -n "$ns" addr add "$ip/24" dev dg0
  ip -n "$ns" link set dg0 up
  [ -n "${RATE:-}" ] && tc -n "$ns" qdisc replace dev dg0 root tbf rate "$RATE" burst 1mb latency "${LATENCY:-50ms}"
  echo "$ip:$per_host" >> "$work/hostfile"
  case_lines+="  $ip) ns=$ns ;;"$'\n'
done
# UCX leaves out interfaces without carrier when MPI starts: wait until every cable is up
for ns in "${hosts[@]}"; do
  for _ in $(seq 500); do ip -n "$ns" link show dg0 | grep -q "state UP" && break; sleep 0.02; done
done
# hydra calls `SCRIPT HOST COMMAND` (the command as one shell string, as for ssh): run it in HOST's namespace
cat > "$work/netns_rsh.sh" <<EOF
#!/bin/sh
host=\$1; shift
case \$host in
$case_lines  *) echo "netns_rsh: unknown host \$host" >&2; exit 1 ;;
esac
exec ip netns exec "\$ns" sh -c "\$*"
EOF
chmod +x "$work/netns_rsh.sh"
echo "simhosts: $n hosts (${hosts[*]}), $per_host rank(s) each${RATE:+, links shaped to $RATE}" >&2

# in the background, not exec'd: the EXIT trap must run after mpirun, and a SIGTERM/Ctrl-C to
# this script must reach mpirun (which forwards it to the ranks: they checkpoint and exit)
ip netns exec "${hosts[0]}" env UCX_TLS=tcp,self "$mpirun_bin" -launcher rsh -launcher-exec "$work/netns_rsh.sh" \
  -f "$work/hostfile" -iface dg0 -n $((n * per_host)) \
  "$python_bin" -m distgpt.train --config "$config" parallel.threads_per_rank="$threads" "$@" &
job=$!
trap 'kill -TERM "$job" 2>/dev/null || true' INT TERM
rc=0
wait "$job" || rc=$?
while kill -0 "$job" 2>/dev/null; do     # wait returned early for a trapped signal
  rc=0; wait "$job" || rc=$?
done
exit "$rc"
