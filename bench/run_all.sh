#!/usr/bin/env bash
# Run every performance benchmark; results go to bench/results/<name>.{json,md}. About 3 minutes on 2 cores.
#   bench/run_all.sh              set up .venv and .venv-bench (scripts/setup --bench), then run all three
#   bench/run_all.sh --no-setup   skip the setup step (environments already there)
# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (a workaround for old OpenBLAS builds on some machines) slow down
# the OpenBLAS inside current numpy wheels, so they are removed for the benchmark processes only; the
# results record that they were removed and their values.
set -euo pipefail
cd "$(dirname "$0")/.."

setup=1
for arg in "$@"; do
  case "$arg" in
    --no-setup) setup=0 ;;
    -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
    *) echo "run_all.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
if [ $setup = 1 ]; then scripts/setup --bench; fi

# Tell the benchmarks what was removed, since they can no longer see it themselves.
removed=""
for var in OPENBLAS_CORETYPE OPENBLAS_L2_SIZE; do
  if [ -n "${!var+set}" ]; then removed="${removed:+$removed,}$var=${!var}"; fi
done

bench() {  # bench NAME [ARGS...]: one benchmark in .venv-bench, without the OpenBLAS overrides
  echo "== bench/$1.py"
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE EDGEFL_BENCH_UNSET="$removed" \
    .venv-bench/bin/python "bench/$1.py" "${@:2}"
}

start=$SECONDS
bench head_training
bench device_footprint      # measures the device env .venv (and .venv-bench for comparison) in subprocesses
bench embedding_throughput
bench round_bookkeeping    # the per-update round bookkeeping at 1,000 to 100,000 selected devices (pure, seconds)
bench aggregator_throughput # real aggregator workers + private Mosquitto/PostgreSQL, 100 to 100,000 devices (~30 min)
bench compression           # every update codec on the real recordings, validation and test seeds (~30 min)
echo "== done in $((SECONDS - start)) s; results:"
for name in head_training device_footprint embedding_throughput; do echo "  bench/results/$name.json  bench/results/$name.md"; done
