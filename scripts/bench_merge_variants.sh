#!/usr/bin/env bash
# Times the merge engine of several code variants side by side in one device call: each
# variant is a folder holding `mergeopt/` and `scripts/bench_merge.py` (e.g. made with
# `git archive REV mergeopt scripts/bench_merge.py | tar -x -C .cache/variant-NAME`), and
# bench_merge.py imports the mergeopt beside it. Variants run in the order given, then the
# first again, so the spread between its two runs shows the noise.
#   bash scripts/bench_merge_variants.sh OUT_DIR VARIANT_DIR... -- BENCH_ARGS...
set -euo pipefail
out=$1; shift
variants=()
while [ "$#" -gt 0 ] && [ "$1" != "--" ]; do variants+=("$1"); shift; done
shift || true
mkdir -p "$out"
for variant in "${variants[@]}" "${variants[0]}"; do
  name=$(basename "$variant")
  log="$out/$name.txt"; [ -e "$log" ] && log="$out/$name-again.txt"
  echo "== $name $(date -u +%H:%M:%S)" | tee -a "$out/progress.txt"
  python3 "$variant/scripts/bench_merge.py" "$@" > "$log" 2> "${log%.txt}.err" || echo "exit $? for $name" | tee -a "$out/progress.txt"
  tail -20 "$log"
done
