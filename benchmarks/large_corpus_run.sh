#!/usr/bin/env bash
# The guide's schedule on a large real corpus, on a lent GPU machine (issue 20's run). In the
# background (setsid), so that it outlives one device call; follow it with `wait`.
#   bash benchmarks/large_corpus_run.sh corpus   # build the corpus only ($W/corpus, W=/tmp/large)
#   bash benchmarks/large_corpus_run.sh start    # build the corpus, then train as the guide types it
#                                                # (MAX_STEPS=N: at most N steps a stage)
#   bash benchmarks/large_corpus_run.sh wait N   # wait up to N s for the run, print its progress
#   bash benchmarks/large_corpus_run.sh report   # metrics, log and times to $OUT (EVAL=1: evaluate checkpoints too)
# The working tree carries .gpu_text/, made here by `python benchmarks/gather_prose.py --out .gpu_text`:
# the prose (*.txt.xz: ../shared/data/text and Debian's documentation packages) and held-out prose
# (heldout_text/: ../shared/docs and the training guide, in no corpus); held-out code is mm_rec/.
set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
OUT=${OUT:-/tmp/out}; W=${W:-/tmp/large}; mkdir -p "$OUT" "$W"
HELDOUT="--heldout_text $PWD/.gpu_text/heldout_text --heldout_code $PWD/mm_rec"
unpack() { mkdir -p "$W/text"; for f in .gpu_text/*.txt.xz; do xz -dc "$f" > "$W/text/$(basename "$f" .xz)"; done; }
case "$1" in
corpus)  # only the corpus, in the foreground (benchmarks/bench_quality.py's --data_dir)
  unpack
  [ -f $W/corpus/meta.json ] || python3 -m mm_rec.scripts.build_corpus --out $W/corpus --text_dir $W/text --json $W/corpus.json ;;
start)
  unpack
  rm -f $W/train.rc; rm -rf $W/checkpoints
  setsid nohup bash -c "
    date +%s > $W/t0
    [ -f $W/corpus/meta.json ] || python3 -m mm_rec.scripts.build_corpus --out $W/corpus --text_dir $W/text --json $W/corpus.json \
      > $W/corpus.log 2>&1 || { echo 1 > $W/train.rc; exit 1; }
    date +%s > $W/t1
    cd $W && python3 -m mm_rec.scripts.train_modular --stage all --checkpoint_dir ./checkpoints \
      --data_dir $W/corpus $HELDOUT ${MAX_STEPS:+--max_steps $MAX_STEPS} > $W/train.log 2>&1
    echo \$? > $W/train.rc; date +%s > $W/t2" > /dev/null 2>&1 &
  sleep 5; echo started ;;
wait)
  end=$(( $(date +%s) + ${2:-500} ))
  while [ ! -f "$W/train.rc" ] && [ "$(date +%s)" -lt "$end" ]; do sleep 10; done
  tail -c 1500 "$W/corpus.log" 2>/dev/null | tr '\r' '\n' | tail -4
  tail -c 6000 "$W/train.log" 2>/dev/null | tr '\r' '\n' | grep -v "^\s*$" | tail -25
  [ -f "$W/train.rc" ] && echo "train rc=$(cat $W/train.rc) build $(( $(cat $W/t1) - $(cat $W/t0) )) s, train $(( $(cat $W/t2) - $(cat $W/t1) )) s"
  nvidia-smi --query-gpu=memory.used,utilization.gpu --format=csv,noheader ;;
report)
  cd "$W"
  cp corpus.json checkpoints/metrics.jsonl "$OUT/"; cat t0 t1 t2 > "$OUT/times.txt"; ls -la checkpoints > "$OUT/checkpoints.txt"
  tr '\r' '\n' < train.log | grep -v "^Stage stage[0-9]: .*]\s*$\|^\s*$" > "$OUT/train_lines.log"
  [ -n "${EVAL:-}" ] || exit 0   # EVAL=1: also evaluate the best and last checkpoints (a few minutes)
  for ck in checkpoints/checkpoint_stage2_best.pt checkpoints/checkpoint_stage3_best.pt \
            $(ls -t checkpoints/checkpoint_stage3_step_*.pt | head -1); do
    echo "== $ck"
    (cd - > /dev/null; python3 -m mm_rec.scripts.evaluate --checkpoint "$W/$ck" --expert all \
       --json "$OUT/eval_val_$(basename "$ck" .pt).json")
    (cd - > /dev/null; python3 -m mm_rec.scripts.evaluate --checkpoint "$W/$ck" --expert all \
       --text .gpu_text/heldout_text --code mm_rec --json "$OUT/eval_heldout_$(basename "$ck" .pt).json")
  done 2>&1 | tee "$OUT/eval.log" ;;
esac
