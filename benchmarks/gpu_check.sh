#!/usr/bin/env bash
# GPU readiness check, one prepared run on one CUDA device (sized for an H200 and 8 minutes):
#   1. parity tests on cuda in bf16: tests/test_generate.py and the recurrent tests of tests/test_ops.py
#      (LOLCATS_TEST_DEVICE=cuda LOLCATS_TEST_DTYPE=bfloat16; tolerances are stated in those files)
#   2. the decode step compiled by inductor on cuda (fullgraph, same output as eager)
#   3. stage 1 (attention transfer) on the reference model: tokens/s and peak device memory at
#      L = 2048 / 8192 / 32768, beside the teacher's plain forward (bf16 weights, fp32 φ and γ):
#      benchmarks/bench_stage1.py --device cuda --dtype bfloat16
#   4. decode ms/token and device memory at 1k / 32k contexts: lolcats.cli.bench.bench_decode (what
#      `lolcats bench decode` runs) on the reference model converted without training, and its teacher
# Every step has its own timeout, and writes its results as it goes, so a step that runs out of time
# keeps what it measured. Everything lands in RESULTS_DIR (default benchmarks/results/gpu): env.txt,
# tests-bf16.{txt,xml}, compile.txt, stage1.{json,md}, decode.{json,txt,png}, summary.{json,md}.
#
# Usage: bash benchmarks/gpu_check.sh [RESULTS_DIR] [--cpu-smoke]
#   --cpu-smoke  every step on the CPU at tiny sizes (a few minutes on 2 cores): proves the script works
#                end to end where there is no GPU. Its numbers mean nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

out=benchmarks/results/gpu
smoke=0
for arg in "$@"; do
  case "$arg" in
    --cpu-smoke) smoke=1 ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *) out=$arg ;;
  esac
done
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
mkdir -p "$out"

if [ "$smoke" = 1 ]; then
  device=cpu; dtype=bfloat16
  stage1_lengths=64,256; decode_contexts=64,256; decode_tokens=4
  # A few parity tests in bf16 on the CPU: the same fixtures and tolerances as on cuda.
  tests_k="test_decode_matches_full_forward_for_every_attention_kind or test_prefill_then_decode or test_left_padded_rows_decode or phi_once or prefix"
  t_env=60; t_tests=600; t_compile=300; t_stage1=300; t_decode=300
  compile_test="tests/test_ops.py::test_step_traces_as_one_graph"  # inductor on 2 CPU cores takes too long
else
  device=cuda; dtype=bfloat16
  stage1_lengths=2048,8192,32768; decode_contexts=1024,32768; decode_tokens=32
  tests_k=""
  # Sum 455 s: the 8-minute budget less process start-up.
  t_env=15; t_tests=150; t_compile=60; t_stage1=130; t_decode=100
  compile_test="tests/test_ops.py::test_step_compiles_with_inductor"
fi

steps=()
run_step() {  # run_step NAME SECONDS LOGFILE CMD... : timeout, log, and one line of the summary
  local name=$1 seconds=$2 log=$3; shift 3
  local started=$SECONDS
  echo "== $name (timeout ${seconds}s)"
  timeout -k 10 "$seconds" "$@" >"$log" 2>&1
  local rc=$?
  local took=$((SECONDS - started))
  tail -n 3 "$log"
  echo "== $name: rc=$rc in ${took}s"
  steps+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $took, \"timed_out\": $([ $rc = 124 ] || [ $rc = 137 ] && echo true || echo false), \"log\": \"$(basename "$log")\"}")
}

# ---- 0. environment ---------------------------------------------------------------------------------
run_step env "$t_env" "$out/env.txt" bash -c "
  date -u; git rev-parse HEAD 2>/dev/null; git status --short 2>/dev/null | head -20
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  '$python' -c 'import torch, transformers; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda,
    \"available\", torch.cuda.is_available(), \"transformers\", transformers.__version__)'
  [ '$device' = cpu ] || '$python' -c 'import torch; assert torch.cuda.is_available(), \"no CUDA device\"'"
if [ "$device" = cuda ] && ! grep -q "available True" "$out/env.txt"; then
  echo "no CUDA device: run with --cpu-smoke on a machine without one" >&2
fi

# ---- 1. parity tests in bf16 on the device ----------------------------------------------------------
recurrent_ops_tests=(
  tests/test_ops.py::test_state_from_prefix_continues_like_stepping
  tests/test_ops.py::test_state_from_prefix_is_the_state_steps_reach
  tests/test_ops.py::test_each_key_passes_through_phi_once
  tests/test_ops.py::test_step_traces_as_one_graph
)
run_step tests-bf16 "$t_tests" "$out/tests-bf16.txt" env LOLCATS_TEST_DEVICE="$device" LOLCATS_TEST_DTYPE="$dtype" \
  "$python" -m pytest -q -p no:cacheprovider -o addopts="" -m "not slow" ${tests_k:+-k "$tests_k"} \
  --junitxml="$out/tests-bf16.xml" tests/test_generate.py "${recurrent_ops_tests[@]}"

# ---- 2. the decode step compiled on the device --------------------------------------------------------
run_step compile "$t_compile" "$out/compile.txt" env LOLCATS_TEST_DEVICE="$device" LOLCATS_TEST_DTYPE="$dtype" \
  "$python" -m pytest -q -p no:cacheprovider -o addopts="" -m "slow or not slow" --durations=3 "$compile_test"

# ---- 3. stage 1 against the teacher's forward -------------------------------------------------------
run_step stage1 "$t_stage1" "$out/stage1.txt" "$python" benchmarks/bench_stage1.py --device "$device" --dtype "$dtype" \
  --lengths "$stage1_lengths" --repeats 3 --timeout $((t_stage1 / 3)) --out "$out/stage1"

# ---- 4. decode latency and memory against context ---------------------------------------------------
run_step decode "$t_decode" "$out/decode.txt" "$python" - "$device" "$dtype" "$decode_contexts" "$decode_tokens" "$out/decode" <<'PY'
import json, sys
from pathlib import Path

sys.path.insert(0, "benchmarks")
import torch

import lolcats
from lolcats.cli.bench import bench_decode
from lolcats.evaluate.report import plot_decode
from reference_model import reference_model

device, dtype = torch.device(sys.argv[1]), getattr(torch, sys.argv[2])
contexts, new_tokens, out = [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4]), Path(sys.argv[5])
if device.type == "cpu":
    torch.set_num_threads(2)
models = {"linearized": lolcats.convert(reference_model()).to(device, dtype),
          "teacher": reference_model().to(device, dtype)}
result = bench_decode(models, contexts, new_tokens=new_tokens, echo=lambda line: print(line, flush=True))
result["model"] = "benchmarks/reference_model.py (random weights), converted with the default LinearizeConfig, untrained"
out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
try:
    plot_decode(result, out.with_suffix(".png"))
except ImportError as err:
    print(f"no plot: {err}")
PY

# ---- summary ----------------------------------------------------------------------------------------
{
  echo "{\"device\": \"$device\", \"dtype\": \"$dtype\", \"cpu_smoke\": $([ $smoke = 1 ] && echo true || echo false), \"steps\": ["
  for i in "${!steps[@]}"; do
    [ "$i" -gt 0 ] && echo ","
    echo "  ${steps[$i]}"
  done
  echo "]}"
} >"$out/summary.json"
{
  echo "# GPU check ($device, $dtype$([ $smoke = 1 ] && echo ', CPU smoke: sizes are tiny, numbers mean nothing'))"
  echo
  echo "Parity tests: $(grep -Eo '[0-9]+ (passed|failed|skipped|error)[^=]*' "$out/tests-bf16.txt" | tail -n 1)"
  echo
  echo "Compiled step: $(grep -Eo '[0-9]+ (passed|failed|skipped|error)[^=]*' "$out/compile.txt" | tail -n 1)"
  echo
  [ -f "$out/stage1.md" ] && cat "$out/stage1.md" && echo
  echo '```'
  grep -E "prefill|decode after" "$out/decode.txt"
  echo '```'
} >"$out/summary.md"
cat "$out/summary.md"
failed=0
for s in "${steps[@]}"; do
  case "$s" in *'"rc": 0,'*) ;; *) failed=1 ;; esac
done
exit $failed
