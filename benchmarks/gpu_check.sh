#!/usr/bin/env bash
# The GPU check: one command, in priority order, each step under `timeout`, about 10 minutes on one
# H100/H200 (15 at most; on 2026-11-27 an H200 took 9 s for env, 91 s for eager, about 50 s a compiled variant, 42 s
# for recording, 26 s for vit, seeds unmeasured (at most 60 s); STEPS=compiled2 asks for 5 more; where DALI is installed the dali steps come first and
# may take up to 7 minutes more, unmeasured yet: STEPS="dali dali-train" runs them alone). Writes each step's output as text (and JSON where the benchmark has it)
# under $OUT (default runs/gpu_check), and prints the tables. Run it from the repository root
# whenever a GPU is at hand, and put its numbers, with the GPU named, in docs/performance.md.
#
#   bash benchmarks/gpu_check.sh            # on the GPU machine
#   SMOKE=1 bash benchmarks/gpu_check.sh    # every step at toy size on the CPU, to check the script
#
# Steps, in priority order (each cut short on its own, the others still run; STEPS="env eager ..." runs
# only those named):
#   env        GPU, driver, torch, CUDA, the machine's copy bandwidth and bf16 matrix rate
#   dali       the DALI loader alone (models.imagenet_dali, nvJPEG on the GPU) against the torch loader, on
#              generated ImageNet-sized JPEGs (benchmarks/loader.py; issue 27's target: >= 6,500 images/s
#              with 16 CPU cores); skipped with a message where NVIDIA DALI is not installed ('.[dali]')
#   dali-train resnet50 training fed by the DALI loader and by the torch loader against a repeated batch,
#              bp and wm with a mirror batch after every step (benchmarks/imagenet_gpu.py; target: DALI-fed
#              >= 0.95 x the repeated batch); skipped like dali
#   beside     mirror batches on a CUDA side stream give the serial run's numbers (tests/test_schedule.py, eager
#              and compiled; needs pytest)
#   eager      resnet50 b256 224px bf16 channels_last: every rule (ia also on a sampled quarter of each
#              batch: ia-sub, InformationAlignment(sub_batch=64)), and wm + a mirror batch after every
#              step with the noise that settles B within 5 deg, serially and beside the next forward pass
#              (a side stream), against plain torch (benchmarks/throughput.py)
#   compiled   torch.compile: plain torch, ss, dfa, sa, wm + mirror (5 deg) serially and beside, each profiled
#              after timing (the busiest kernels, kernel time and kernels per step against wall time per step,
#              under $OUT/profiles); bp fa kp wm were measured compiled on 2026-11-27 (docs/performance.md)
#   recording  recording every step (and probes; and with compiled metrics) against none, under wm
#              (benchmarks/recording.py)
#   vit        torchvision's ViT-B/16 converted by from_torch, b64 224px bf16: bp, fa, kp, wm against plain torch
#   mirror     the same as eager, wm + a mirror batch of as many noise samples as the training batch
#   loader     the ImageNet data pipeline on generated JPEGs, nvjpeg decode on the GPU (benchmarks/loader.py)
#   seeds      S = 1, 3, 10 seeds of the authors' MNIST MLP batched as one circuit (SeedBatch) against one by one,
#              bp and wm with a mirror batch after every step (benchmarks/seeds.py; issue 28's target on a CPU:
#              3 batched seeds >= 2.5x one by one, where a GPU's launch-bound steps should gain most)
#   compiled2  torch.compile: the rest of the rules (usf, brsf, frsf, ia); not run unless named in STEPS
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_DISABLE=1

if [[ -n "${SMOKE:-}" ]]; then
    NET=(--arch resnet18 --batch-size 2 --image-size 32 --device cpu)
    TIMED=(--steps 1 --warmup 1 --rounds 2)
    TIMED_COMPILED=("${TIMED[@]}")
    TIMED_VIT=("${TIMED[@]}")
    LOADER=(--images 16 --batch-size 4 --workers 1 --classes 2 --device cpu)
    DALI_LOADER=("${LOADER[@]}")
    DALI_TRAIN=(--smoke)
    VIT=(--arch vit_small --batch-size 2 --image-size 28 --device cpu)
    SCALE=1
    SEEDS=(--seeds 1 3 --steps 3 --device cpu)
    DEFAULT_STEPS="env dali dali-train beside eager recording vit mirror loader seeds"     # compiling on a CPU takes minutes: STEPS=compiled asks
else
    NET=(--arch resnet50 --batch-size 256 --image-size 224)
    TIMED=(--steps 10 --warmup 3 --rounds 5)
    TIMED_COMPILED=(--steps 10 --warmup 3 --rounds 3)
    TIMED_VIT=(--steps 20 --warmup 3 --rounds 10)     # 33 ms steps: 5 rounds of 10 spread by 0.2 on an H200
    LOADER=(--images 3072 --batch-size 256 --classes 16)
    DALI_LOADER=(--images 8192 --batch-size 256 --classes 16 --epochs 4)
    DALI_TRAIN=(--rules bp wm --budget-s 270)
    VIT=(--arch vit_b_16 --batch-size 64 --image-size 224)
    SCALE=${SCALE:-1}
    SEEDS=(--device cuda)
    DEFAULT_STEPS="env dali dali-train beside eager compiled recording vit mirror loader seeds"
fi

STEPS="${STEPS:-$DEFAULT_STEPS}"

step() {   # step NAME SECONDS COMMAND...: run under timeout, output to $OUT/NAME.txt and the screen
    local name=$1 seconds=$(( $2 * SCALE )); shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    echo "=== $name (at most ${seconds}s): $*"
    local start=$SECONDS
    timeout -k 5 "$seconds" "$@" > >(tee "$OUT/$name.txt") 2> "$OUT/$name.err"
    local rc=$?
    echo "=== $name: exit $rc after $(( SECONDS - start ))s$( ((rc == 124)) && echo ' (timed out)')"
    ((rc == 0)) || tail -n 5 "$OUT/$name.err"
}

step env 30 python3 - <<'EOF'
import platform, shutil, subprocess, time, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm",
                          "--format=csv"], capture_output=True, text=True).stdout.strip())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: {p.multi_processor_count} SMs, {p.total_memory / 2**30:.1f} GiB")
    def timed(fn, n=10):
        fn(); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize(); return (time.perf_counter() - t) / n
    a = torch.randn(2**28, device="cuda")      # 1 GiB
    b = torch.empty_like(a)
    print(f"device copy: {2 * a.numel() * 4 / timed(lambda: b.copy_(a)) / 1e12:.2f} TB/s (read + write)")
    del a, b
    m = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    print(f"bf16 8192^3 matmul: {2 * 8192**3 / timed(lambda: m @ m) / 1e12:.0f} TFLOP/s")
EOF

if python3 -c "import nvidia.dali" 2>/dev/null; then
    step dali 120 python3 benchmarks/loader.py "${DALI_LOADER[@]}" --loader torch dali --paths device
    step dali-train 300 python3 benchmarks/imagenet_gpu.py "${DALI_TRAIN[@]}" --loaders torch dali \
        --json "$OUT/dali_train.json"
elif [[ " $STEPS " == *" dali"* ]]; then
    echo "=== dali, dali-train: skipped: NVIDIA DALI is not installed here (pip install '.[dali]': nvidia-dali-cuda120)"
fi
step beside 90 python3 -m pytest -p no:cacheprovider -q tests/test_schedule.py -k beside_learning_give
step eager 130 python3 benchmarks/throughput.py "${NET[@]}" "${TIMED[@]}" --modes eager --mirror-angle 5 \
    --json "$OUT/eager.json"
step compiled 330 env TORCH_LOGS=recompiles,graph_breaks python3 benchmarks/throughput.py "${NET[@]}" "${TIMED_COMPILED[@]}" \
    --modes compiled --mirror-angle 5 --rules ss dfa sa wm+mirror wm+mirror-beside --json "$OUT/compiled.json" \
    --profile "$OUT/profiles"
step recording 90 python3 benchmarks/recording.py "${NET[@]}" --rule wm --steps 20 --warmup 3 --rounds 3
step vit 90 python3 benchmarks/throughput.py "${VIT[@]}" "${TIMED_VIT[@]}" --modes eager --rules bp fa kp wm \
    --json "$OUT/vit.json"
step mirror 60 python3 benchmarks/throughput.py "${NET[@]}" "${TIMED[@]}" --modes eager --rules wm+mirror wm+mirror-beside \
    --json "$OUT/mirror.json"
step loader 60 python3 benchmarks/loader.py "${LOADER[@]}" --paths device
step seeds 60 python3 benchmarks/seeds.py "${SEEDS[@]}"
step compiled2 300 python3 benchmarks/throughput.py "${NET[@]}" "${TIMED_COMPILED[@]}" --modes compiled \
    --rules usf brsf frsf ia --json "$OUT/compiled2.json"
echo "=== all steps done; outputs in $OUT"
