#!/usr/bin/env bash
# The GPU checks of issue 8 in one go, for a lent GPU machine whose python3 already holds a CUDA
# build of torch and eqaudit's dependencies (nothing is installed): the calls that make the host
# wait for the GPU (find_syncs.py), the timing benchmark on cuda (a short audit with a profile,
# a long one with images in memory and drawn by eqaudit), the per-image-loop baseline, the GPU
# tests, and a CLI audit on cuda and on the CPU with their numbers compared.
# About 5 minutes on an H100. Usage: OUT=folder bash benchmarks/gpu_check.sh [IMAGES [LONG]]
# (default 256 and 2048); logs go to $OUT (default ./gpu-check). STEPS picks steps (default all:
# "kernels syncs bench baselines tests time cli suite"), for a lease with little time left.
# "kernels" times the per-layer D4 comparison's variants (bench_compare_kernels.py, ~1 min);
# "long" is the bench step's LONG-image case alone (all layers with the Triton comparison
# kernel and with torch ops, side by side); "slope" the same at 4 x LONG images (not in the
# default steps; with "long", the fixed and the per-image costs of each case);
# "suite" runs the whole test suite there (torch and onnxruntime as the image has them), with
# pytest-xdist (not in the dev extra: pip install pytest-xdist where it is missing).
# KERNELS_OPTS adds options to the kernels step (--no-compile: skip torch.compile's minute),
# TIME_IMAGES sets the time step's images (default LONG), SUITE_S the suite's time limit.
set -u
images=${1:-256}
long=${2:-2048}
out=${OUT:-gpu-check}
steps=" ${STEPS:-kernels syncs bench baselines tests time cli suite} "
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=python3
step() { echo; echo "=== $1 ($(date +%T))"; }
want() { [[ $steps == *" $1 "* ]]; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv
nproc
$py -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('onnxruntime', o.__version__, o.get_available_providers())"

want kernels && step "the per-layer D4 comparison, variants side by side" &&
timeout 150 $py benchmarks/bench_compare_kernels.py --device cuda --images 64 ${KERNELS_OPTS:-} 2>&1 |
    tee "$out/kernels.log" | tail -8

want syncs && step "calls that wait for the GPU" &&
timeout 240 $py benchmarks/find_syncs.py --images 64 --batch-size 256 2>&1 | tee "$out/syncs.log"

bench() {  # bench_audit on cuda: IMAGES DATA BATCH REPEATS [extra options]
    step "bench_audit torch on cuda, $1 images, --data $2, batch $3"
    timeout ${BENCH_S:-200} $py benchmarks/bench_audit.py --backend torch --device cuda --images "$1" \
        --data "$2" --batch-size "$3" --repeats "$4" --fresh 0 --memory off --cap off "${@:5}" \
        2>&1 | tee "$out/bench_$1_$2_$3.log" | grep -A4 "median of\|fastest of\|repeat [0-9]"
}
if want bench; then
    bench "$images" memory 256 3 --profile
    bench "$long" memory 512 2 --profile
    bench "$long" synthetic 512 1
elif want long; then
    bench "$long" memory 512 2
fi
# The same at 4 x LONG images: what a case costs per image beyond its fixed part (set-up, the
# layers' grid graph, the first batch's checks) is (t(4 LONG) - t(LONG)) / 3 LONG, and the
# ratio of those marginal costs is the audit's per-image overhead over plain inference.
want slope && BENCH_S=400 bench "$((4 * long))" memory 512 1

want baselines && step "bench_baselines torch on cuda" &&
timeout 120 $py benchmarks/bench_baselines.py --device cuda --skip onnx,polygraphy \
    --images 512 --batch-size 512 2>&1 | tee "$out/bench_baselines.log" | tail -8

want tests && step "GPU tests" &&
timeout 150 $py -m pytest -q -p no:cacheprovider tests/test_device.py tests/data/test_prefetch.py \
    tests/metrics/test_channel_map.py 2>&1 | tee "$out/tests.log" | tail -15

want time && step "kernel time on the device vs wall-clock time" &&
timeout 150 $py benchmarks/gpu_time.py --images "${TIME_IMAGES:-$long}" 2>&1 | tee "$out/gpu_time.log"

if want cli; then
step "CLI audit on cuda and on the CPU (reports)"
for device in cuda cpu; do
    timeout 120 $py -m eqaudit check eqaudit/demo/assets/demo_cnn.pt \
        --factory eqaudit.demo.model:build --input-size 64 --device $device \
        --data eqaudit/demo/assets/images --transforms d4,rot:30 -o /tmp/eqaudit-$device \
        >"$out/cli_$device.log" 2>&1
    echo "$device: exit $?"; tail -3 "$out/cli_$device.log"
done
$py - <<'PY'
import json
a, b = (json.load(open(f"/tmp/eqaudit-{d}/summary.json")) for d in ("cpu", "cuda"))
print("scores cpu", a["scores"], "\nscores gpu", b["scores"])
worst = max(
    (abs(x["relative_error"] - y["relative_error"]), x["layer"], x["transform"])
    for x, y in zip(a["layers"], b["layers"])
    if x["relative_error"] is not None and y["relative_error"] is not None
)
print("largest |cpu - gpu| layer relative error:", worst)
PY
fi

if want suite; then  # last: the longest step, and the one a short lease can lose
    step "the whole suite on this machine"
    # -v: xdist prints each failure's name as it happens, so a run cut short still names them
    COLUMNS=120 timeout ${SUITE_S:-240} $py -m pytest -v -p no:cacheprovider -n 14 -rf \
        >"$out/suite.log" 2>&1
    grep -E "FAILED|ERROR|[0-9]+ (passed|failed)" "$out/suite.log" | sort -u | tail -25
fi
