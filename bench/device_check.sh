#!/usr/bin/env bash
# The accelerator check of issue 8, sized for ~8 minutes on one H200.
#
#   bash bench/device_check.sh --prepare      # here, with network: fills .whl/
#   bash bench/device_check.sh                # there (carry .whl); prints one table
#   DEVICE_CHECK_TINY=1 bash bench/device_check.sh   # smoke run of the script on a CPU
#
# Steps: install the wheels the device image lacks (from .whl/, no network);
# a test subset; the UNet train-step benchmark (bench/bench_unet_peer.py) in
# float32 and bfloat16 with MFU against the bf16 peak (and the diffusers peer
# where torch sees the same accelerator); the FID extraction benchmark (random
# weights: the 87 MB weight file does not fit the 64 MiB the device tool
# carries; speed does not depend on the values); a short real-data VAE run in
# bf16 on a CIFAR-100 subset carried in .whl/cifar100_subset. Each step has its
# own time limit and log under $OUT (or /tmp/device_check); a failing step is
# reported in the table and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHEELS=.whl
TINY=${DEVICE_CHECK_TINY:-0}
# A slow or shared CPU (the tiny mode's smoke runs) needs longer step limits.
LIMIT_SCALE=${DEVICE_CHECK_LIMIT_SCALE:-1}

if [[ "${1:-}" == "--prepare" ]]; then
  # What the 'cuda' image lacks (its package list is in the device notes):
  # pinned like requirements*.txt, Python 3.12 manylinux wheels, no deps.
  set -e
  mkdir -p "$WHEELS"
  for spec in ml_collections==1.1.0 grain==0.2.18 array_record==0.8.6 \
      tensorflow-datasets==4.9.10 tensorboardX==2.6.5 importlib_resources==7.1.0 \
      dm-tree==0.1.9 simple-parsing==0.1.7 docstring-parser==0.17.0 \
      immutabledict==4.2.1 tensorflow-metadata==1.17.2 toml==0.10.2 termcolor==3.1.0 \
      googleapis-common-protos==1.70.0 diffusers==0.42.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --platform any -d "$WHEELS" "$spec" \
      || echo "could not fetch $spec (the step that needs it will fail there)"
  done
  # promise is published as a source archive only: build its (pure) wheel.
  python3 -m pip wheel -q --no-deps -w "$WHEELS" promise==2.3 || echo "no promise wheel"
  # 4,000 train / 1,000 test real images (15 MB): the full set does not fit.
  python3 - <<'EOF'
import os, numpy as np
src, dst = "/work/shared/data/cifar100", ".whl/cifar100_subset"
os.makedirs(dst, exist_ok=True)
with np.load(f"{src}/cifar100_train_0of4.npz") as f:
  arrays = {k: v[:4000] for k, v in f.items() if k.startswith("train_")}
np.savez(f"{dst}/cifar100_train_0of1.npz", shard=np.array([0, 1], np.int32),
         first_index=np.int64(0), **arrays)
with np.load(f"{src}/cifar100_test.npz") as f:
  np.savez(f"{dst}/cifar100_test.npz", **{k: v[:1000] for k, v in f.items()})
for name in ("labels.txt", "coarse_labels.txt"):
  with open(f"{src}/{name}") as a, open(f"{dst}/{name}", "w") as b:
    b.write(a.read())
EOF
  du -sh "$WHEELS"
  exit 0
fi

OUT_DIR=${OUT:-/tmp/device_check}
mkdir -p "$OUT_DIR"
RESULTS=$OUT_DIR/results.jsonl
STEPS=$OUT_DIR/steps.tsv
: > "$RESULTS"
: > "$STEPS"
export PYTHONUNBUFFERED=1

# run_step NAME SECONDS COMMAND...: runs with a time limit, logs, records status.
run_step() {
  local name=$1 limit=$(( $2 * LIMIT_SCALE ))
  shift 2
  local start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
  local rc=$?
  local status=ok
  [[ $rc -ne 0 ]] && status="FAILED rc=$rc"
  printf '%s\t%s\t%s\n' "$name" "$status" "$((SECONDS - start))" >> "$STEPS"
  tail -n 4 "$OUT_DIR/$name.log"
}

# Install only where the stack is missing (the device image); here it is there.
if ! python3 -c "import ml_collections, grain, tensorflow_datasets, tensorboardX" 2>/dev/null \
    && compgen -G "$WHEELS/*.whl" > /dev/null; then
  run_step install 120 python3 -m pip install -q --no-index --no-deps --no-compile \
    --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$ROOT:${PYTHONPATH:-}

if [[ "$TINY" == 1 ]]; then
  BATCH=8; CHANNELS=16; STEPS_PER_ROUND=1; ROUNDS=1; FID_NUM=4; FID_BATCH=4
  TRAIN_STEPS=4; VAE_CONFIG=configs/tiny_vae.py; TESTS="tests/test_models.py -k timestep_embedding_formula"
else
  BATCH=64; CHANNELS=128; STEPS_PER_ROUND=20; ROUNDS=3; FID_NUM=1000; FID_BATCH=200
  TRAIN_STEPS=300; VAE_CONFIG=configs/cifar100_vae.py; TESTS="tests/test_mixed_precision.py tests/test_diffusion.py tests/test_models.py"
fi

run_step env 60 python3 -c "
import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())"
# The test suite runs on 8 fake CPU devices (tests/conftest.py), whatever the
# machine has: this checks that the installed stack works, not the GPU.
run_step tests 150 python3 -m pytest -q -x -p no:cacheprovider $TESTS
PEER=--no-torch
python3 -c "import torch, diffusers; assert torch.cuda.is_available()" 2>/dev/null && PEER=
for dtype in float32 bfloat16; do
  run_step "unet_step_$dtype" 150 python3 bench/bench_unet_peer.py --dtype=$dtype \
    --batch-size=$BATCH --unet-channels=$CHANNELS --steps=$STEPS_PER_ROUND \
    --rounds=$ROUNDS --json="$RESULTS" $([[ $dtype == float32 ]] && echo "$PEER" || echo --no-torch)
done
run_step fid 120 python3 bench/bench_fid.py --random-weights --num=$FID_NUM \
  --batch-size=$FID_BATCH --rounds=2 --json="$RESULTS"

# Real data: prepare the carried subset, then a short bf16 VAE run on it.
DATA=/tmp/device_check_tfds
SUBSET=$WHEELS/cifar100_subset
if [[ -d "$SUBSET" ]]; then
  run_step prepare_data 60 python3 -c "
from ldm_jax import data
data.prepare('$DATA', '$SUBSET', expected_sizes={'train': 4000, 'test': 1000})"
  rm -rf /tmp/device_check_vae
  run_step train_vae_bf16 150 python3 train.py --config=$VAE_CONFIG \
    --workdir=/tmp/device_check_vae --config.data.data_dir=$DATA \
    --config.train.compute_dtype=bfloat16 --config.train.num_steps=$TRAIN_STEPS \
    --config.train.log_every=$((TRAIN_STEPS / 4)) --config.train.eval_every=$TRAIN_STEPS \
    --config.train.checkpoint_every=$TRAIN_STEPS --config.eval.num_examples=1000 \
    --config.train.progress_bar=False
  cp /tmp/device_check_vae/metrics.jsonl "$OUT_DIR/train_vae_metrics.jsonl" 2>/dev/null
fi

python3 - "$RESULTS" "$STEPS" "$OUT_DIR/train_vae_metrics.jsonl" <<'EOF'
import json, os, sys
results, steps, metrics = sys.argv[1:4]
print("\n==== device check ====")
for line in open(steps):
  name, status, seconds = line.rstrip("\n").split("\t")
  print(f"step {name:18s} {status:12s} {seconds:>5s} s")
print(f"{'benchmark':28s} {'img/s':>9s} {'GFLOP/s':>9s} {'of matmul':>9s} {'MFU bf16':>9s}")
for line in open(results):
  r = json.loads(line)
  if r["bench"] == "unet_step":
    for name in ("ldm-jax", "diffusers"):
      if name in r:
        x = r[name]
        mfu = f"{x['gflops'] / (r['peak_tflops'] * 1e3):9.1%}" if r.get("peak_tflops") else f"{'-':>9s}"
        print(f"{'unet step ' + r['dtype'] + ' ' + name:28s} {x['img_s']:9.1f} {x['gflops']:9.0f} "
              f"{x['gflops'] / r['matmul_gflops']:9.0%} {mfu}")
  elif r["bench"] == "fid":
    print(f"{'fid features (batch ' + str(r['batch_size']) + ')':28s} {r['jax_img_s']:9.1f}")
if os.path.exists(metrics):
  rows = [json.loads(l) for l in open(metrics)]
  train = [r for r in rows if "train/loss" in r]
  evals = [r for r in rows if "eval/psnr" in r]
  if train:
    print(f"vae bf16 real data: step {train[-1]['step']}, loss {train[0]['train/loss']:.4f} -> "
          f"{train[-1]['train/loss']:.4f}, {train[-1].get('train/steps_per_second', float('nan')):.2f} steps/s"
          + (f", eval PSNR {evals[-1]['eval/psnr']:.2f} dB" if evals else ""))
EOF
