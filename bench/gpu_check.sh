#!/usr/bin/env bash
# The prepared GPU check of issue 5: every speed benchmark with the paper UNet on one GPU (an H200), in
# about 8 minutes. Run from the repository root through the device tool (bench/README.md says how):
#
#     COMMIT=$(git rev-parse --short HEAD) bash bench/gpu_check.sh     # results in $OUT (default /tmp/ddpm-gpu-check)
#
# Needs .whl/ (diffusers, datasets and the two packages the GPU image lacks, one CIFAR-10 shard in
# .whl/cifar10/ and the FID Inception stand-in .whl/inception_standin.pt): see bench/README.md. Each stage
# has its own time limit, so one slow stage cannot eat the others' time; every stage's output goes to
# $OUT/gpu_check.log and its figures to $OUT/<stage>.json.
set -u
OUT=${OUT:-/tmp/ddpm-gpu-check}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

# ---- packages: carried wheels into a private site folder -----------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache   # shared by the stages: later compiles of the same graphs hit it
# SMOKE=1: the same stages at toy sizes on whatever device there is (checks the script itself on a CPU).
if [ "${SMOKE:-0}" = 1 ]; then
    MODEL=tiny TRAIN_BATCH=8 TRAIN_STEPS=2 CHECK_STEPS=2 SAMPLE_BATCH=4 SAMPLE_STEPS=4 DATA_DEVICE=cpu DATA_ROUNDS=1 MAX_SAMPLES=500 LIMIT_SCALE=4
    FID_BATCH=4 FID_STEPS=4 FID_REFERENCE=16
else
    MODEL=ddpm-cifar10 TRAIN_BATCH=128 TRAIN_STEPS=100 CHECK_STEPS=20 SAMPLE_BATCH=1000 SAMPLE_STEPS=100 DATA_DEVICE=cuda DATA_ROUNDS=3 MAX_SAMPLES=10000 LIMIT_SCALE=1
    FID_BATCH=1000 FID_STEPS=100 FID_REFERENCE=500
fi
SAMPLE_VARIANTS="fp32,bf16+oldloop,bf16,bf16+compile+oldloop,bf16+compile"   # compiled last: a stage cut short keeps the eager figures
# The FID Inception network: the real one where this machine has it, else the stand-in (same graph, random weights:
# same cost) carried in .whl/. SMOKE makes a stand-in and uses it, to check the path a GPU lease takes.
STANDIN=.whl/inception_standin.pt FID_INCEPTION=auto
if [ "${SMOKE:-0}" = 1 ]; then
    STANDIN=$OUT/inception_standin.pt
    python3 bench/fid_generation.py --write_standin "$STANDIN" && FID_INCEPTION=standin
fi
DATA=.whl/cifar10; [ -d ../shared/data/cifar10 ] && DATA=../shared/data/cifar10; [ -d "$DATA" ] || DATA=builtin:cifar10-1k

echo "=== environment (t=$(elapsed)s) commit ${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
python3 - <<'EOF' | tee "$OUT/env.txt"
import importlib, platform, os
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda, "| cudnn", torch.backends.cudnn.version())
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", "| cpus", os.cpu_count())
for name in ("diffusers", "datasets", "accelerate", "transformers", "huggingface_hub", "pyarrow", "fsspec", "torchvision", "triton"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as e:
        print(f"{name}: NOT IMPORTABLE ({type(e).__name__}: {e})")
from ddpm_hf import inception_weights
print("FID Inception network:", inception_weights.installed_copy() or "not installed (the fid stage takes the stand-in)")
EOF
echo "data: $DATA"

stage() {  # stage NAME LIMIT_SECONDS COMMAND...
    local name=$1 limit=$(( $2 * LIMIT_SCALE )); shift 2
    echo; echo "=== $name (limit ${limit}s, t=$(elapsed)s): $*"
    timeout --signal=INT --kill-after=15 "$limit" "$@"
    echo "=== $name: exit $? after $(elapsed)s in all"
}

# No test stage: every test in tests/ pins the CPU (the CUDA-only ones tested ddpm_hf/fast_sampling.py and went
# with it). What the sampling tests check on the CPU, fp32 engine images == stock DDPMPipeline images with one
# generator per image, stage 2 shows on the GPU: its max |diff| column, 0 expected for fp32.

# ---- 1. training: ours vs the diffusers-example-style loop, paper UNet, batch 128, bf16 -----------
# 2 alternating rounds of 2 x 100 timed steps each (our first 100 steps, with compilation, are dropped),
# then one run of ours without compile and one without channels_last, to see whether each wins; then the paths
# only a GPU takes (eager, 2 x 20 steps each): fp16 with Accelerate's GradScaler, and a run without channels_last
# resumed with it (fused AdamW and the optimizer state's layout). `check ... ok` lines in the log, "checks" in train.json.
stage train 250 python3 bench/train_throughput.py --model $MODEL --batch $TRAIN_BATCH --precision bf16 --steps $TRAIN_STEPS --intervals 2 \
    --rounds 2 --dataset "$DATA" --max_train_samples $MAX_SAMPLES --ablation "compile=no;channels_last=no" \
    --checks "fp16;channels_last_resume" --check_steps $CHECK_STEPS --json "$OUT/train.json"

# ---- 2. sampling: generate_images vs stock DDPMPipeline (fp32, one generator per image), paper UNet, batch 1000
# 100 steps of the 1000-step schedule: the UNet is the same at every step, so images/s of the full
# 1000-step chain are these divided by 10 for both. Variants show what bf16 autocast and compile each add,
# and +oldloop the loop before issue 20 (timesteps on the device, host syncs before each step's noise draw):
# the "loop before -> after" lines give images/s before and after, eager and compiled.
stage sample 160 python3 bench/sample_throughput.py --model $MODEL --batch $SAMPLE_BATCH --steps $SAMPLE_STEPS --rounds 1 \
    --variants "$SAMPLE_VARIANTS" --json "$OUT/sample.json"

# ---- 3. FID generation: the command users run, `ddpm-hf evaluate --dtype bf16 --compile`, paper UNet ------------
# Two image sets of 1000 in one batch each (--repeats 2), ddpm 100 steps of 1000: set 1 pays for compilation (the
# sample stage's bf16+compile has filled the inductor cache with the same graph), set 2 is the steady rate. The
# Inception rate is timed apart, which gives the chain's rate and FID-50k at 1000 steps on 1 and 8 GPUs.
stage fid 110 python3 bench/fid_generation.py --model $MODEL --batch $FID_BATCH --steps $FID_STEPS --sets 2 --variants bf16+compile \
    --reference_images $FID_REFERENCE --inception $FID_INCEPTION --standin_file "$STANDIN" --json "$OUT/fid.json"

# ---- 4. data path: batches built on the GPU vs the per-sample PIL path -----------------------------
stage data 45 python3 bench/data_throughput.py --dataset "$DATA" --max_images $MAX_SAMPLES --batch 128 --rounds $DATA_ROUNDS \
    --device $DATA_DEVICE --json "$OUT/data.json"

echo; echo "=== done in $(elapsed)s; files in $OUT:"; ls -la "$OUT"
