#!/usr/bin/env bash
# Side by side, same machine, same run, same client concurrency: end-to-end tool calls on a
# three-hub Flotilla cluster (durable writes) and single-key puts on a three-member etcd
# cluster (Debian's etcd-server). Prints both tables and the ratio, the ceiling any gateway
# has here (the same MCP server called directly), and what a call costs: CPU by part,
# Raft entries and fsyncs.
#   bench/compare-etcd.sh [CLIENTS] [TOTAL]
set -euo pipefail
cd "$(dirname "$0")/.."
clients=${1:-16}
total=${2:-2000}

if ! command -v etcd >/dev/null || ! command -v etcdctl >/dev/null || ! command -v protoc >/dev/null; then
  apt-get update -qq && apt-get install -y -qq etcd-server etcd-client protobuf-compiler
fi
cargo build --release -q -p flotilla-cli -p flotilla-bench
CARGO_TARGET_DIR=target/etcd-put cargo build --release -q --manifest-path bench/etcd-put/Cargo.toml

work=$(mktemp -d)
pids=()
# Stop the members and wait for them before removing their data (a member whose data dir
# vanished while it shut down was seen to linger).
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

# Six free loopback ports for three members (client, peer).
read -r -a ports < <(python3 -c '
import socket
socks=[socket.socket() for _ in range(6)]
for s in socks: s.bind(("127.0.0.1",0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')
cluster=""
for i in 0 1 2; do cluster+="e$i=http://127.0.0.1:${ports[$((2*i+1))]},"; done
cluster=${cluster%,}
endpoints=""
for i in 0 1 2; do
  c=${ports[$((2*i))]}; p=${ports[$((2*i+1))]}
  etcd --name "e$i" --data-dir "$work/e$i" \
    --listen-client-urls "http://127.0.0.1:$c" --advertise-client-urls "http://127.0.0.1:$c" \
    --listen-peer-urls "http://127.0.0.1:$p" --initial-advertise-peer-urls "http://127.0.0.1:$p" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token bench \
    >"$work/e$i.log" 2>&1 &
  pids+=($!)
  endpoints+="http://127.0.0.1:$c,"
done
endpoints=${endpoints%,}
for _ in $(seq 1 100); do
  if ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1; then break; fi
  sleep 0.2
done
ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1

echo "clients: $clients, operations per side: $total, date: $(date -u +%F)"
echo
echo "| system | operations | ops/s | p50 ms | p99 ms | max ms |"
echo "|---|---|---|---|---|---|"
cpu_ms() { python3 -c '
import sys
t=0
for p in sys.argv[1:]:
    f=open(f"/proc/{p}/stat").read().rsplit(")",1)[1].split()
    t+=int(f[11])+int(f[12])
print(t*10)' "$@"; }
# fsyncs, counted over the whole machine while each side runs (nothing else runs here), when
# `perf` can count syscalls; the Flotilla side's count includes starting its cluster.
syncs() { # FILE COMMAND...: runs COMMAND, its fsync + fdatasync count into FILE
  local out=$1; shift
  if perf stat -a -x, -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -o "$out" -- true >/dev/null 2>&1; then
    perf stat -a -x, -e syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync -o "$out" -- "$@"
  else
    : >"$out"; "$@"
  fi
}
# Runs a command and prints, after its output, the CPU it and its children used (ms):
#   python3 -c "$with_cpu" COMMAND...
with_cpu='
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=subprocess.PIPE, text=True)
print(r.stdout, end="")
u = resource.getrusage(resource.RUSAGE_CHILDREN)
print(f"client_cpu_ms {(u.ru_utime + u.ru_stime) * 1000:.0f}")
sys.exit(r.returncode)'
sum_syncs() { awk -F, '/sys_enter_f/ {n+=$1} END {print n+0}' "$1"; }
etcd_cpu0=$(cpu_ms "${pids[@]}")
etcd_out=$(syncs "$work/etcd.syncs" python3 -c "$with_cpu" target/etcd-put/release/etcd-put --endpoints "$endpoints" --clients "$clients" --total "$total")
etcd_cpu1=$(cpu_ms "${pids[@]}")
echo "$etcd_out" | grep '^|'
# Without --no-direct the bench first calls the same MCP server directly, with no gateway:
# no gateway can do more calls per second than that on this machine.
flt_out=$(syncs "$work/flt.syncs" target/release/flotilla-bench calls --hubs 3 --agents "$clients" --calls "$total" 2>/dev/null)
echo "$flt_out" | grep '^| through' | awk -F'|' '{printf "| Flotilla 3 hubs, end-to-end tool calls |%s|%s|%s|%s|%s|\n", $3, $5, $6, $7, $8}'
echo "$flt_out" | grep '^| direct' | awk -F'|' '{printf "| the same MCP server called directly (no gateway) |%s|%s|%s|%s|%s|\n", $3, $5, $6, $7, $8}'
e=$(echo "$etcd_out" | awk '/^etcd_puts_per_second/ {print $2}')
f=$(echo "$flt_out" | awk '/^flotilla_calls_per_second/ {print $2}')
d=$(echo "$flt_out" | awk '/^direct_calls_per_second/ {print $2}')
echo
python3 -c "print(f'ratio Flotilla calls/s / etcd puts/s: {$f/$e:.3f}')"
python3 -c "print(f'ceiling, direct MCP calls/s / etcd puts/s: {$d/$e:.3f}')"
etcd_client_ms=$(echo "$etcd_out" | awk '/^client_cpu_ms/ {print $2}')
echo "etcd cpu_ms_per_put (three members): $(python3 -c "print(f'{($etcd_cpu1-$etcd_cpu0)/$total:.3f}')") client: $(python3 -c "print(f'{$etcd_client_ms/$total:.3f}')")"
echo "Flotilla $(echo "$flt_out" | grep '^cpu_ms_per_call')"
echo "Flotilla $(echo "$flt_out" | grep '^raft_entries_per_call')"
if [ -s "$work/etcd.syncs" ] && [ -s "$work/flt.syncs" ]; then
  python3 -c "print(f'fsyncs per operation (all processes): etcd {$(sum_syncs "$work/etcd.syncs")/$total:.2f}, Flotilla {$(sum_syncs "$work/flt.syncs")/$total:.2f}')"
fi
