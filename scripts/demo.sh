#!/usr/bin/env bash
# The demo: start the service and the Central Control simulator, register an example script,
# dispatch it to 50 devices, and print the outcome read from the MongoDB projections.
# Exits 0 only when all 50 devices succeeded. The stack (`make stack-up`) must be running.
set -euo pipefail
cd "$(dirname "$0")/.."
ED=.venv/bin/eventdispatch
mkdir -p .stack/demo
export EVENTDISPATCH_NAMESPACE="${EVENTDISPATCH_NAMESPACE:-demo}"
export EVENTDISPATCH_MONGO_DB="${EVENTDISPATCH_MONGO_DB:-eventdispatch_demo}"
export EVENTDISPATCH_REDIS_PREFIX="${EVENTDISPATCH_REDIS_PREFIX:-demo}"

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'exit 130' INT TERM  # run the cleanup on Ctrl-C or kill too

echo "==> starting the Central Control simulator (log: .stack/demo/simulator.log)"
$ED simulate --record .stack/demo/simulator.jsonl > .stack/demo/simulator.log 2>&1 &
pids+=($!)
echo "==> starting the service (log: .stack/demo/service.log)"
$ED run > .stack/demo/service.log 2>&1 &
pids+=($!)
for _ in $(seq 1 100); do
  grep -q "worker started" .stack/demo/service.log 2>/dev/null && break
  sleep 0.2
done
grep -q "worker started" .stack/demo/service.log || { echo "the service did not start:"; tail -20 .stack/demo/service.log; exit 1; }

echo "==> registering examples/system_info.sh"
$ED script register examples/system_info.sh --id system-info

devices=$(seq -s, -f "demo-device-%02g" 1 50)
task="demo-$(date +%Y%m%d-%H%M%S)"
echo "==> dispatching it to 50 devices as task $task"
$ED submit --script system-info --devices "$devices" --task-id "$task" --wait
echo "==> done. The demo ran in namespace $EVENTDISPATCH_NAMESPACE, database $EVENTDISPATCH_MONGO_DB;"
echo "    to look at it again: EVENTDISPATCH_NAMESPACE=$EVENTDISPATCH_NAMESPACE EVENTDISPATCH_MONGO_DB=$EVENTDISPATCH_MONGO_DB $ED status $task"
