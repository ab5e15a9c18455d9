#!/bin/bash
# Device run: aerial cars at a quarter, stage 1 for EP1 epochs, NS seeds as parallel single-seed studies.
# usage: bash .gpudata/gpu.sh NS EP1 DEADLINE_S [extra --set ...]
set -u
NS=$1; EP1=$2; DL=$3; shift 3
OUTD=${OUT:-/tmp/gpu_out}; mkdir -p "$OUTD"
if [ -d .whl ] && ! python3 -c "import faster_coco_eval" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/src OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 PYTHONUNBUFFERED=1
( nvidia-smi -L; python3 -c "import torch,torchvision,faster_coco_eval;print(torch.__version__,torchvision.__version__,faster_coco_eval.__version__,torch.cuda.is_available())"; nproc --all; date -u ) > runs_info.txt 2>&1
cat runs_info.txt
D=.gpudata/aerial_cars
mkdir -p runs/gpu
cp runs_info.txt runs/gpu/
start=$(date +%s)
pids=()
for k in $(seq 0 $((NS-1))); do
  timeout "$DL" python3 -m efpn study --config configs/aerial_cars_quarter.yaml --seeds 1 \
    --set seed=$k --set data.train=$D --set data.val=$D --set stage1.optim.epochs=$EP1 --set data.workers=1 "$@" \
    --arm efpn --arm fused --arm fpn_longer --quiet --out runs/gpu/s$k > runs/gpu/log_s$k.txt 2>&1 &
  pids+=($!)
done
# insurance: a snapshot of the metrics every 45 s
( while sleep 45; do tar czf "$OUTD/partial.tgz" --exclude='*.pt' runs/gpu 2>/dev/null; done ) &
snap=$!
wait "${pids[@]}"
kill $snap 2>/dev/null
echo "all done in $(( $(date +%s) - start )) s"
tar czf "$OUTD/results.tgz" --exclude='*.pt' runs/gpu && rm -f "$OUTD/partial.tgz"
tail -n 3 runs/gpu/log_s*.txt
