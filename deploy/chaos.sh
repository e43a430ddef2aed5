#!/usr/bin/env bash
# Brings up deploy/compose.yaml (3 hubs, 3 nodes in two regions), makes its join and agent
# tokens, then, with tool calls flowing from outside the containers without pause: kills the
# leader's container, pauses a hub, cuts a node off its network, and restarts everything.
# After each fault the cluster must serve a call again; at the end every acknowledged call
# must have reached exactly one terminal state with its own result, and no idempotency key
# may have made two tasks. Ends with `N passed, M failed`; exits 0 only when nothing failed.
# Needs the images from deploy/build-images.sh and docker-compose 1.29.
set -uo pipefail
cd "$(dirname "$0")"
FLOTILLA=${FLOTILLA:-../target/x86_64-unknown-linux-gnu/release/flotilla}
project=flotilla-chaos-$$
work=$(mktemp -d)
passed=0
failed=0
compose() { docker-compose -p "$project" -f compose.yaml "$@"; }
cleanup() {
  touch "$work/stop"
  wait 2>/dev/null
  compose down -v --remove-orphans >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
ok() { echo "ok   $1"; passed=$((passed + 1)); }
fail() { echo "FAIL $1${2:+: $2}"; failed=$((failed + 1)); }
finish() {
  echo "$passed passed, $failed failed"
  [ "$failed" = 0 ]
  exit
}
# Runs "$@" until it succeeds, for at most $1 seconds.
within() {
  local limit=$1
  shift
  local until=$((SECONDS + limit))
  while [ $SECONDS -lt $until ]; do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  return 1
}

for image in flotilla:dev flotilla-node:dev; do
  docker image inspect "$image" >/dev/null 2>&1 || { fail "image $image (deploy/build-images.sh)"; finish; }
done
[ -x "$FLOTILLA" ] || { fail "client binary $FLOTILLA (deploy/build-images.sh builds it)"; finish; }

compose up -d pki hub-0 hub-1 hub-2 >"$work/up.log" 2>&1 || { cat "$work/up.log"; fail "compose up (hubs)"; finish; }
container() { compose ps -q "$1"; }
http_of() { compose port "$1" 7480; }
ready() { curl -fsS "http://$(http_of "$1")/readyz"; }
all_ready() { ready hub-0 && ready hub-1 && ready hub-2; }
if within 90 all_ready; then ok "three hubs elect a leader and are ready"; else fail "hubs ready"; compose logs --tail 20; finish; fi

docker cp "$(container hub-0):/pki/ca.pem" "$work/ca.pem"
admin=""
for h in hub-0 hub-1 hub-2; do
  admin=$(compose exec -T "$h" /flotilla admin-token --data-dir /data 2>/dev/null) && break
done
[ -n "$admin" ] && ok "the first leader left an admin token" || { fail "admin token"; finish; }
export FLOTILLA_CA="$work/ca.pem"
# Where the hubs' API ports are published now (a container that restarts gets new ones):
# written to a file the load loops read before each call.
find_hubs() {
  FLOTILLA_HUB="https://$(compose port hub-0 7443),https://$(compose port hub-1 7443),https://$(compose port hub-2 7443)"
  export FLOTILLA_HUB
  echo "$FLOTILLA_HUB" >"$work/hubs"
}
find_hubs
as_admin() { FLOTILLA_TOKEN="$admin" "$FLOTILLA" "$@"; }

# Prints what "$@" prints once it succeeds, trying for at most 30 s (an election may still
# be settling; making a token twice is harmless).
first_success() {
  local until=$((SECONDS + 30)) out
  while [ $SECONDS -lt $until ]; do
    out=$("$@" 2>"$work/err") && { echo "$out"; return 0; }
    sleep 1
  done
  cat "$work/err" >&2
  return 1
}
join=$(first_success as_admin token create --uses 10 --ttl 3600 --may-add-tools) || { fail "join token"; finish; }
agent=$(first_success as_admin agent-token issue --subject chaos --tenant chaos --scopes tools) || { fail "agent token"; finish; }
ok "join and agent tokens made"
export FLOTILLA_TOKEN="$agent"
FLOTILLA_JOIN_TOKEN="$join" compose up -d node-a1 node-a2 node-b1 >"$work/up.log" 2>&1 || { cat "$work/up.log"; fail "compose up (nodes)"; finish; }
nodes_ready() { [ "$(as_admin nodes -o json | grep -c '"connected": true')" = 3 ]; }
within 60 nodes_ready && ok "three nodes in two regions joined" || fail "nodes joined" "$(as_admin nodes 2>&1)"

# One call, answered within 30 s (a call that hangs is a failure, kept for the diagnosis).
serves() {
  local out
  out=$(timeout 30 "$FLOTILLA" call echo --args '{"text":"still here"}' 2>"$work/serves.err")
  local rc=$?
  [ "$rc" = 124 ] && cp "$work/serves.err" "$work/hung.err"
  [ "$out" = "still here" ]
}
# What the cluster says about the last call that hung, if one did.
diagnose() {
  [ -f "$work/hung.err" ] || return 0
  echo "     a call hung: $(tr '\n' ' ' <"$work/hung.err")"
  local id
  id=$(sed -n 's/^task \([^ ]*\) submitted.*/\1/p' "$work/hung.err" | head -1)
  [ -n "$id" ] && as_admin task get "$id" -o json 2>&1 | head -60
  as_admin nodes 2>&1
  as_admin cluster status 2>&1
  rm -f "$work/hung.err"
}
within 60 serves && ok "a call from outside goes through" || { fail "first call"; finish; }

# Calls without pause: each acknowledged one is written down with its key. The tool,
# `record`, appends the key to a file on the node that runs it, so a call that ran twice
# shows; it is not marked idempotent, so a call on a node that is lost ends `lost` rather
# than running again.
load() {
  local w=$1 i=0
  while [ ! -f "$work/stop" ]; do
    local key="w$w-$i" id
    if id=$(FLOTILLA_HUB=$(cat "$work/hubs") "$FLOTILLA" call record --args "{\"key\":\"$key\"}" --idempotency-key "$key" --no-wait 2>/dev/null); then
      echo "$key $id" >>"$work/acked"
      i=$((i + 1))
    else
      sleep 0.2 # the same key again: a repeat is the same task
    fi
  done
}
load 1 & load 2 &
sleep 3

leader_hub() { as_admin cluster status -o json | sed -n 's/.*"leader_id": \([0-9]*\).*/\1/p' | head -1; }

# 1. kill -9 the leader's container.
l=$(leader_hub)
if [ -n "$l" ] && compose kill -s KILL "hub-$((l - 1))" >/dev/null 2>&1; then
  within 60 serves && ok "serves after the leader (hub $l) was killed" || { fail "serves after leader kill"; diagnose; }
  compose start "hub-$((l - 1))" >/dev/null 2>&1
  within 90 all_ready && ok "the killed hub came back and caught up" || fail "killed hub back"
  find_hubs
else
  fail "a leader to kill"
fi

# 2. pause a hub (the leader: it stops answering without closing anything).
l=$(leader_hub)
if [ -n "$l" ] && compose pause "hub-$((l - 1))" >/dev/null 2>&1; then
  within 60 serves && ok "serves while hub $l is paused" || { fail "serves while paused"; diagnose; }
else
  fail "pausing the leader" "leader: '$l'"
fi
compose unpause "hub-$((l - 1))" >/dev/null 2>&1
within 90 all_ready && ok "the paused hub rejoined" || fail "paused hub rejoined"
find_hubs

# 3. cut a node off its network, then give it back.
net="${project}_region-a"
if docker network disconnect "$net" "$(container node-a1)" >/dev/null 2>&1; then
  within 60 serves && ok "serves right after node-a1 was cut off" || { fail "serves with a node cut off"; diagnose; }
  a1_gone() { as_admin nodes -o json | python3 -c 'import json,sys; sys.exit(not any(n["id"] == "node-a1" and not n["connected"] for n in json.load(sys.stdin)))'; }
  within 30 a1_gone && ok "the hubs see node-a1 gone" || fail "node-a1 never seen gone" "$(as_admin nodes 2>&1)"
  within 60 serves && ok "serves with node-a1 gone" || { fail "serves with node-a1 gone"; diagnose; }
else
  fail "cutting node-a1 off"
fi
docker network connect --alias node-a1 "$net" "$(container node-a1)" >/dev/null 2>&1
within 60 nodes_ready && ok "node-a1 reconnected" || {
  fail "node-a1 reconnected" "$(as_admin nodes 2>&1)"
  docker logs --tail 40 "$(container node-a1)" 2>&1 | cut -c1-300
}

# 4. restart everything.
compose restart >/dev/null 2>&1
within 120 all_ready && ok "every hub ready after a restart of everything" || fail "ready after restart"
find_hubs
within 60 nodes_ready && ok "every node back after the restart" || fail "nodes after restart"
within 60 serves && ok "serves after the restart" || { fail "serves after restart"; diagnose; }

sleep 3
touch "$work/stop"
wait
acked=$(wc -l <"$work/acked")
[ "$acked" -gt 0 ] && ok "$acked calls acknowledged under the faults" || fail "no call was acknowledged"

# What each node's `record` tool wrote.
for n in node-a1 node-a2 node-b1; do
  docker cp "$(container $n):/data/record" "$work/record-$n" >/dev/null 2>&1 || : >"$work/record-$n"
done
# One task per acknowledged key, each ended once, succeeded ones with their own result,
# and no call recorded twice (a succeeded one exactly once).
if FLOTILLA="$FLOTILLA" python3 - "$work/acked" "$work"/record-* >"$work/verdict" <<'PY'
import json, subprocess, sys, time, os
runs = {}
for path in sys.argv[2:]:
    for line in open(path):
        runs[line.strip()] = runs.get(line.strip(), 0) + 1
twice = sorted(k for k, n in runs.items() if n > 1)
acked = {}
for line in open(sys.argv[1]):
    key, task = line.split()
    acked.setdefault(key, set()).add(task)
# Every task of the tenant, by idempotency key: a key that made two tasks shows here even
# when the client saw only one of them.
listed = json.loads(subprocess.run([os.environ["FLOTILLA"], "task", "list", "--limit", "10000",
                                    "-o", "json"], capture_output=True, text=True, check=True).stdout)
by_key = {}
for t in listed:
    if t.get("idempotency_key"):
        by_key.setdefault(t["idempotency_key"], set()).add(t["id"])
two = sorted(k for k, ids in by_key.items() if len(ids) > 1)
two += sorted(k for k, ids in acked.items() if by_key.get(k) != ids)
unfinished, wrong, states = [], [], {}
for key, ids in sorted(acked.items()):
    task = next(iter(ids))
    state, t = None, {}
    deadline = time.time() + 60
    while time.time() < deadline:
        r = subprocess.run([os.environ["FLOTILLA"], "task", "get", task, "-o", "json"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            t = json.loads(r.stdout)
            state = t["state"]
            if state in ("succeeded", "failed", "cancelled", "lost"):
                break
        time.sleep(0.5)
    states[state] = states.get(state, 0) + 1
    if state not in ("succeeded", "failed", "cancelled", "lost"):
        unfinished.append(f"{key}={task}:{state}")
    elif state == "succeeded":
        text = ((t.get("result") or {}).get("content") or [{}])[0].get("text")
        if text != f"recorded {key}" or runs.get(key) != 1:
            wrong.append(f"{key}={task}:{text!r} ran {runs.get(key, 0)}x")
print(json.dumps({"keys": len(acked), "listed": len(listed), "runs": sum(runs.values()), "states": states, "two_tasks": two, "unfinished": unfinished, "wrong": wrong, "ran_twice": twice}))
sys.exit(0)
PY
then
  verdict=$(cat "$work/verdict")
  echo "     $verdict" | cut -c1-300
  field() { python3 -c "import json,sys; v=json.loads(sys.argv[1])['$1']; print(len(v) if isinstance(v, list) else v)" "$verdict"; }
  [ "$(field two_tasks)" = 0 ] && ok "no idempotency key made two tasks" || fail "keys with two tasks" "$verdict"
  [ "$(field unfinished)" = 0 ] && ok "every acknowledged call reached a terminal state" || fail "calls never finished" "$verdict"
  [ "$(field wrong)" = 0 ] && ok "every succeeded call holds its own result and ran once" || fail "calls with a wrong result or run count" "$verdict"
  [ "$(field ran_twice)" = 0 ] && ok "no call ran twice" || fail "calls that ran twice" "$verdict"
else
  fail "checking the acknowledged calls"
fi
finish
