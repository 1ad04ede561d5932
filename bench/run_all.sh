#!/usr/bin/env bash
# Run every benchmark; results go to bench/results/<name>.{json,md}. About two hours on 2 cores (times below).
#   bench/run_all.sh              set up .venv and .venv-bench (scripts/setup --bench), then run them all
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
bench augment_cost          # few-label augmentation on the device: time and memory (seconds)
bench tune                  # every setting chosen on validation data, both datasets (~1.5 h)
bench strategies            # the accuracy report on test seeds, at the tuned settings (~45 min)
bench continual             # adaptation over time and forgetting on UCI HAPT (~3 min)
echo "== done in $((SECONDS - start)) s; results:"
for name in head_training device_footprint embedding_throughput round_bookkeeping aggregator_throughput compression \
    augment_cost tuning strategies continual; do echo "  bench/results/$name.json  bench/results/$name.md"; done
