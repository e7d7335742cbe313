#!/usr/bin/env bash
# The device call of docs/bench/samplers-2026-11-30-rows48.md, from the repo root on the device
# machine (32 cores, GPUs unused), code in $D (a copy of the samplers worktree with the zoo in
# $D/.cache/zoo-2). Rerunning it with the resume files it brought back (states.tgz in $D)
# continues the runs a time limit cut.
set -u
D=${D:-.devrun/samplers}
LIMIT=${LIMIT:-550}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$D PYTHONUNBUFFERED=1
python3 -c "import transformers, optuna, botorch, torch; print('transformers', transformers.__version__, 'optuna', optuna.__version__, 'botorch', botorch.__version__, 'torch', torch.__version__)" | tee $OUT/log.txt
lscpu | grep -E "Model name|^CPU\(s\)" | tee -a $OUT/log.txt
mkdir -p st && { [ -f $D/states.tgz ] && tar xzf $D/states.tgz || true; }
[ -f $D/rows48.jsonl ] && cp $D/rows48.jsonl $OUT/rows48.jsonl
B="python3 $D/scripts/bench_samplers.py run --budget 48 --out $OUT/rows48.jsonl --state-dir st"
# ap-bmm (the slowest) on cores 0-11, two threads a run; everything else on cores 12-31.
timeout -k 10 $LIMIT $B --problem zoo,zoo-experts --samplers ap-bmm --seeds 0,1,2 \
  --jobs 6 --threads 2 --pin --first-cpu 0 > $OUT/apbmm.log 2>&1 &
# 2026-11-30 the "experts" design also held the model-level midpoint (since dropped): see the
# notes of docs/bench/samplers-2026-11-30-rows48.md.
V='{"experts": {"expert_design": true}, "parent": {"expert_design": false}}'
E='{"experts": {"expert_design": true}}'
timeout -k 10 $LIMIT $B --problem zoo,zoo-experts --jobs 20 --threads 1 --pin --first-cpu 12 \
  --group '{"samplers": "sipbmm-reference,botorch", "seeds": "0,1,2"}' \
  --group "{\"samplers\": \"saasbo-prior\", \"seeds\": \"3,4,5\", \"variants\": $V}" \
  --group "{\"samplers\": \"saasbo-prior,saasbo-noprior\", \"seeds\": \"0,1,2\", \"variants\": $E}" \
  --group '{"samplers": "random,tpe", "seeds": "0"}' \
  --group '{"samplers": "grid", "seeds": "0", "budget": 24}' \
  --group '{"samplers": "grid", "seeds": "0"}' > $OUT/rest.log 2>&1 &
wait
tar czf $OUT/states.tgz st
grep -c . $OUT/rows48.jsonl | tee -a $OUT/log.txt
tail -3 $OUT/apbmm.log $OUT/rest.log
