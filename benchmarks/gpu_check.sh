#!/usr/bin/env bash
# The GPU checks of issue 8 in one go, for a lent GPU machine whose python3 already holds a CUDA
# build of torch and eqaudit's dependencies (nothing is installed): the GPU tests, a CLI audit on
# cuda (report written), the timing benchmark on cuda with profiles, and the per-image-loop
# baseline. Usage: OUT=folder bash benchmarks/gpu_check.sh [IMAGES]. Logs go to $OUT.
set -u
images=${1:-256}
out=${OUT:-gpu-check}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
py=python3
step() { echo; echo "=== $1"; }

step "machine"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm --format=csv
nproc
$py -c "import torch, onnxruntime as o; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0)); print('onnxruntime', o.__version__, o.get_available_providers())"

step "GPU tests"
timeout 180 $py -m pytest -q -p no:cacheprovider tests/test_device.py 2>&1 | tee "$out/tests.log" | tail -15

step "CLI audit on cuda and on the CPU (reports)"
for device in cuda cpu; do
    timeout 120 $py -m eqaudit check eqaudit/demo/assets/demo_cnn.pt \
        --factory eqaudit.demo.model:build --input-size 64 --device $device --data eqaudit/demo/assets/images \
        --transforms d4,rot:30 -o /tmp/eqaudit-$device >"$out/cli_$device.log" 2>&1
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

for batch in 64 256; do
    step "bench_audit torch on cuda, $images images, batch $batch"
    timeout 240 $py benchmarks/bench_audit.py --backend torch --device cuda --images "$images" \
        --batch-size $batch --repeats 3 --memory off --cap off $([ $batch = 64 ] && echo --profile) \
        2>&1 | tee "$out/bench_audit_$batch.log" | grep -A4 "median of\|fastest of\|repeat [0-9]"
done

step "bench_baselines torch on cuda"
timeout 200 $py benchmarks/bench_baselines.py --device cuda --skip onnx,polygraphy \
    --images 64 2>&1 | tee "$out/bench_baselines.log" | tail -15
