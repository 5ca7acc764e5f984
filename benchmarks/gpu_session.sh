#!/usr/bin/env bash
# One call on a lent GPU machine: install the carried fla-core wheel, then run the named phases,
# logs and JSON under $OUT. The working tree carries .whl/ (fla-core wheel) and, for the training
# phases, .gpu_data/default32k (the default corpus prepared here: python -c "from mm_rec.data.corpus
# import ensure_default_corpus; ensure_default_corpus(32000)", copied from ~/.cache/mm_rec).
#   bash benchmarks/gpu_session.sh tests bench        # GPU tests, training-step benchmark
#   bash benchmarks/gpu_session.sh bench_ab           # the training step before the structure change and now
#   bash benchmarks/gpu_session.sh decode train ddp   # decode latency, real runs, 2-GPU DDP
#   bash benchmarks/gpu_session.sh train_compiled     # the real run with --compile_mode reduce-overhead
#   bash benchmarks/gpu_session.sh train_graphed      # the real run with --compile --cuda_graph
#   bash benchmarks/gpu_session.sh ops sweep          # the recurrences alone; fla launch configs
#   bash benchmarks/gpu_session.sh guide bundled      # every guide command as typed; the bundled-corpus 100M run
# A call returns at most 8 files from $OUT: PACK_LOGS=NAME.tgz packs the logs into one at the end.
set -u
# SITE: where the wheels go (WHEELS: which; default fla-core only, the flash-linear-attention wheel
# adds fla.models for bench_train's fla-gla variant). Installed once: concurrent sessions on the
# machine's GPUs (CUDA_VISIBLE_DEVICES) share it.
SITE=${SITE:-/tmp/site}
export PYTHONUNBUFFERED=1 PYTHONPATH=$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# (fla.models comes from the second wheel: a machine that has only fla-core installs again)
need=$SITE/fla; [[ ${WHEELS:-} == *flash_linear_attention* ]] && need=$SITE/fla/models
[[ -d $need ]] || python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target "$SITE" \
    ${WHEELS:-.whl/fla_core-*.whl} 2>&1 | grep -v "as the 'root' user" | tail -1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia_smi.txt"
git rev-parse HEAD 2>/dev/null | tee "$OUT/commit.txt"
DATA=${DATA:-.gpu_data/default32k}
RUNS=${RUNS:-/tmp/runs}
STEPS=${STEPS:-60}          # optimizer steps per stage in the training phases
                            # (SCALING_STEPS: for the ddp phase's throughput run, default STEPS)
has() { [[ " $PHASES " == *" $1 "* ]]; }
PHASES="$*"

if has tests; then
  # The other CUDA tests first (a minute): the trainer's sync-free step (the device-side skip of a
  # non-finite step, the read-back, the batch's copy from pinned memory), the captured step, the
  # graphed decode step. Then the kernels against their references: most of that time is Triton
  # compiling each (T, state, dtype) case on a bare machine (over 400 s on one H200), so with two GPUs
  # visible the long-term half runs on the second one at the same time.
  CUDA_TESTS="tests/training/test_train.py::test_a_non_finite_step_changes_nothing_on_the_device
             tests/training/test_train.py::test_a_step_record_reads_back_its_own_values
             tests/training/test_train.py::test_a_batch_goes_to_the_gpu_through_pinned_memory
             tests/training/test_train.py::test_cuda_graph_captured_on_the_gpu_trains_like_the_uncaptured_step
             tests/training/test_step_graph.py tests/training/test_checkpoint.py
             tests/inference/test_decode_cuda.py"
  gpu_tests() {  # gpu_tests NAME DEVICE TIMEOUT pytest-args...: one line of result (pytest's summary)
    CUDA_VISIBLE_DEVICES=$2 timeout $3 python3 -m pytest -q -s -p no:cacheprovider --durations=0 "${@:4}" \
        > "$OUT/$1.log" 2>&1
    local rc=$?; [[ $rc == 124 ]] && echo "$1: TIMED OUT after $3 s (pytest did not finish)"
    echo "$1 rc=$rc: $(grep -E '[0-9]+ (passed|failed)' "$OUT/$1.log" | tail -1)"
  }
  dev=${CUDA_VISIBLE_DEVICES:-0}
  gpu_tests cuda_tests $dev ${CUDA_TESTS_TIMEOUT:-240} $CUDA_TESTS
  if [[ -z ${CUDA_VISIBLE_DEVICES:-} && $(nvidia-smi -L | wc -l) -ge 2 ]]; then
    gpu_tests gpu_ops_long 1 ${TESTS_TIMEOUT:-540} tests/ops/test_gpu_ops.py -k long_term &
    gpu_tests gpu_ops_rest 0 ${TESTS_TIMEOUT:-540} tests/ops/test_gpu_ops.py -k "not long_term"; wait
  else
    gpu_tests gpu_ops $dev ${TESTS_TIMEOUT:-540} tests/ops/test_gpu_ops.py
  fi
  grep -hE "^(short|long)" "$OUT"/gpu_ops*.log | sort -k3 -g | tail -3
fi
if has ops; then  # the recurrences alone (bench_ops.py), and fla launch-config candidates
  timeout 300 python3 benchmarks/bench_ops.py --out "$OUT/ops.json" --profile 2x8192 > "$OUT/ops.log" 2>&1
  echo "ops rc=$?"; grep -E "^[0-9]+x[0-9]+ " "$OUT/ops.log"
fi
if has sweep; then
  timeout 300 python3 benchmarks/sweep_fla_configs.py --out "$OUT/sweep.json" > "$OUT/sweep.log" 2>&1
  echo "sweep rc=$?"; cat "$OUT/sweep.log"
fi
if has bench; then  # BENCH_NAME names the files, for several bench runs in one call
  name=${BENCH_NAME:-bench}
  timeout ${BENCH_TIMEOUT:-360} python3 benchmarks/bench_train.py --out "$OUT/${name}_train.json" \
      ${BENCH_ARGS:---shapes stage1,stage2,8x8192 --pytorch-max-tokens 4096 --repeats 5 --steps 3} \
      > "$OUT/$name.log" 2>&1
  echo "$name rc=$?"; grep -v "warm-up" "$OUT/$name.log" | grep -A30 "^shape " | tail -32
fi
if has bench_ab; then  # the training step of the tree before the structure change (.gpu_data/before.tgz:
  # git archive a355fbe mm_rec benchmarks | gzip) against this tree's, MM-Rec graphed at the stage
  # shapes, interleaved: before, now, before, now (one process each: each tree imports its own mm_rec)
  rm -rf /tmp/before && mkdir -p /tmp/before && tar xzf .gpu_data/before.tgz -C /tmp/before
  args="--shapes stage1,stage2,stage3 --variants mmrec-gpu-graphed --repeats 5 --steps 5 --warmup 3"
  for round in 1 2; do
    (cd /tmp/before && PYTHONPATH=$SITE:/tmp/before timeout 240 python3 benchmarks/bench_train.py $args \
        --out "$OUT/bench_before_$round.json" > "$OUT/bench_before_$round.log" 2>&1); echo "before $round rc=$?"
    timeout 240 python3 benchmarks/bench_train.py $args --out "$OUT/bench_now_$round.json" \
        > "$OUT/bench_now_$round.log" 2>&1; echo "now $round rc=$?"
  done
  python3 - "$OUT" <<'PY'
import json, sys, statistics
from pathlib import Path
out = Path(sys.argv[1])
def rows(tree):
    got = {}
    for f in sorted(out.glob(f"bench_{tree}_*.json")):
        for r in json.loads(f.read_text())["results"]:
            got.setdefault(r["shape"], []).append(r["tokens_per_s"])
    return got
before, now = rows("before"), rows("now")
print(f"{'shape':8} {'before tok/s':>14} {'now tok/s':>12} {'now/before':>10}")
for shape in now:
    b, n = statistics.median(before.get(shape, [float("nan")])), statistics.median(now[shape])
    print(f"{shape:8} {b:>14,.0f} {n:>12,.0f} {n / b:>10.3f}")
PY
fi
if has decode; then
  timeout 150 python3 benchmarks/bench_decode.py --device cuda --preset 100m --contexts 1024 65536 \
      --batch_sizes 1 32 --cuda_graph --json "$OUT/decode_cuda.json" > "$OUT/decode.log" 2>&1
  echo "decode rc=$?"; tail -8 "$OUT/decode.log"
fi
train() {  # train NAME NPROC BATCHES(stage1,2,3) [extra args]: the three stages, STEPS each
  local name=$1 nproc=$2 b=(${3//,/ }) STEPS=${RUN_STEPS:-$STEPS}; shift 3
  local launch="python3 -m mm_rec.scripts.train_modular"
  [[ $nproc -gt 1 ]] && launch="torchrun --standalone --nproc_per_node=$nproc -m mm_rec.scripts.train_modular"
  for i in 1 2 3; do
    local resume=(--overwrite)  # stage 1 starts a new run, also where an earlier session left one
    [[ $i -gt 1 ]] && resume=(--resume_from "$RUNS/$name/checkpoint_stage$((i - 1))_step_$STEPS.pt")
    $launch --stage stage$i --data_dir $DATA --checkpoint_dir $RUNS/$name --batch_size ${b[$((i - 1))]} \
        --max_steps $STEPS --checkpoint_interval $((STEPS / 2)) --eval_interval 0 --eval_batches 4 \
        --warmup_steps 10 "${resume[@]}" "$@" ${TRAIN_ARGS:-} >> "$OUT/train_$name.log" 2>&1 || { echo "run $name stage$i failed"; tail -5 "$OUT/train_$name.log"; return 1; }
  done
}
if has train; then
  train single 1 4,2,4
  python3 benchmarks/compare_runs.py $RUNS/single --json "$OUT/train_single.json"
fi
if has train_compiled; then  # the same single-GPU run with the compiled (CUDA-graphed) step
  train single_compiled 1 4,2,4 --compile --compile_mode reduce-overhead
  python3 benchmarks/compare_runs.py $RUNS/single_compiled --json "$OUT/train_single_compiled.json"
fi
if has train_graphed; then  # the whole step one CUDA graph, the layer compiled inside it
  train single_graphed 1 4,2,4 --compile --cuda_graph
  python3 benchmarks/compare_runs.py $RUNS/single_graphed --json "$OUT/train_single_graphed.json"
fi
if has ddp; then
  train ddp2_same_global 2 2,1,2       # the same global batch as "single": losses must agree
  RUN_STEPS=${SCALING_STEPS:-$STEPS} train ddp2 2 4,2,4   # the guide's batch per GPU: scaling
  # a 2-GPU mid-stage checkpoint resumed on 1 GPU (same global batch): must continue like "single"
  python3 -m mm_rec.scripts.train_modular --stage stage1 --data_dir $DATA --checkpoint_dir $RUNS/resume1 \
      --batch_size 4 --max_steps $STEPS --checkpoint_interval $STEPS --eval_interval 0 --eval_batches 4 \
      --warmup_steps 10 --resume_from $RUNS/ddp2_same_global/checkpoint_stage1_step_$((STEPS / 2)).pt ${TRAIN_ARGS:-} >> "$OUT/train_resume1.log" 2>&1 \
      || { echo "resume failed"; tail -5 "$OUT/train_resume1.log"; }
  python3 benchmarks/compare_runs.py $RUNS/single $RUNS/ddp2_same_global $RUNS/resume1 $RUNS/ddp2 \
      --json "$OUT/train_ddp.json"
fi
if has guide; then  # every command of the training guide as typed (+ --max_steps G), on the bundled corpus
  G=${GUIDE_STEPS:-40}; GD=/tmp/guide; rm -rf $GD; mkdir -p $GD/s1.3 $GD/s4 $GD/s8.1 $GD/s10
  guide() {  # guide NAME DIR command...: the command from DIR, its log under $OUT, one line of result
    local name=$1 dir=$2; shift 2
    (cd "$GD/$dir" && timeout 900 "$@") > "$OUT/guide_$name.log" 2>&1
    echo "guide $name rc=$? $(grep -cE '^⚠️|Warning' "$OUT/guide_$name.log") warnings; $(grep -E '^first step|Checkpoint saved' "$OUT/guide_$name.log" | tail -1)"
  }
  T="python3 -m mm_rec.scripts.train_modular"
  guide 1.3 s1.3 $T --stage stage1 --batch_size 2 --checkpoint_dir ./checkpoints --checkpoint_interval 50 \
      --vocab_size 32000 --expert_dim 256 --num_layers 16 --num_heads 8 --ffn_dim 3072 --max_steps $G
  guide 4.1 s4 $T --stage stage1 --batch_size 4 --checkpoint_dir ./checkpoints --checkpoint_interval 100 --vocab_size 32000 --max_steps $G
  guide 4.2 s4 $T --stage stage2 --batch_size 2 --checkpoint_dir ./checkpoints --checkpoint_interval 200 \
      --resume_from ./checkpoints/checkpoint_stage1_step_$G.pt --max_steps $G
  guide 4.3 s4 $T --stage stage3 --batch_size 4 --checkpoint_dir ./checkpoints --checkpoint_interval 100 \
      --resume_from ./checkpoints/checkpoint_stage2_step_$G.pt --max_steps $G
  guide 8.1 s8.1 $T --stage all --batch_size 2 --checkpoint_dir ./checkpoints_test --checkpoint_interval 50 --vocab_size 1000 --max_steps $G
  guide 10.all s10 $T --stage all --max_steps $G
  CK=$GD/s4/checkpoints/checkpoint_stage3_step_$G.pt
  guide 5.1-9.3 s4 python3 $PWD/benchmarks/guide_snippets.py --checkpoint $CK --device cuda
  guide evaluate s4 python3 -m mm_rec.scripts.evaluate --checkpoint $CK --expert all --max_batches 4
  guide generate s4 python3 -m mm_rec.scripts.generate --checkpoint $CK --prompt "def main():" --expert code --max_new_tokens 32 --seed 0
  guide export s4 python3 -m mm_rec.scripts.export --checkpoint $CK --out ./exported --format both
  guide recovery s4 bash $PWD/mlops/recovery_protocol.sh --help
  if [[ $(nvidia-smi -L | wc -l) -ge 2 ]]; then
    guide 8.3 s10 torchrun --nproc_per_node=2 -m mm_rec.scripts.train_modular --stage all --batch_size 8 --max_steps $G \
        --checkpoint_dir ./checkpoints_ddp
  fi
fi
if has bundled; then  # the 100M model on the bundled corpus alone: the epochs warning and the best checkpoint
  BD=/tmp/bundled; rm -rf $BD; mkdir -p $BD
  (cd $BD && timeout 1500 python3 -m mm_rec.scripts.train_modular --stage all --checkpoint_dir ./checkpoints \
      --max_steps ${BUNDLED_STEPS:-3000}) > "$OUT/bundled.log" 2>&1
  echo "bundled rc=$?"; tr '\r' '\n' < "$OUT/bundled.log" | grep -E "^(data:|⚠️|📊|⏹️|🏅|best)" | head -60
  cp $BD/checkpoints/metrics.jsonl "$OUT/bundled_metrics.jsonl"
  python3 - "$BD/checkpoints" <<'PY'
import json, sys, torch
from pathlib import Path
run = Path(sys.argv[1])
rows = [json.loads(l) for l in open(run / "metrics.jsonl")]
for stage in ("stage1", "stage2", "stage3"):
    evals = [(sum(v for k, v in r.items() if k.startswith("val_loss")) / 2, r["step"]) for r in rows
             if r["type"] == "eval" and r["stage"] == stage]
    best = run / f"checkpoint_{stage}_best.pt"
    saved = torch.load(best, map_location="cpu", weights_only=False)["step"] if best.exists() else None
    print(f"{stage}: lowest mean validation loss {min(evals)[0]:.4f} at step {min(evals)[1]}, "
          f"last {evals[-1][0]:.4f} at {evals[-1][1]}; {best.name} holds step {saved}")
PY
fi
# With TRAIN_ARGS="--profile_step N" the runs' top-ops tables come back too (their traces stay).
for f in "$RUNS"/*/profile_*.txt; do [[ -e $f ]] && cp "$f" "$OUT/$(basename "$(dirname "$f")")_$(basename "$f" .txt).log"; done
# A call brings back at most 8 files from $OUT: the logs travel as one archive.
if [[ -n ${PACK_LOGS:-} ]]; then
  (cd "$OUT" && logs=$(ls *.log 2>/dev/null) && [[ -n $logs ]] && tar czf "$PACK_LOGS" $logs && rm -f $logs)
fi
ls "$OUT"
