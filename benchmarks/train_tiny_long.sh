#!/usr/bin/env bash
# The long-clip vggt-tiny: 12 frame + 12 global blocks grown from the 6 + 6 model of commit 189e6d8 (identity copies,
# so training starts from the old model's function) and trained on clips of 2-48 frames (walks, and arcs for half of
# the steps of at most 16 frames), 384 frames per step. Runs in the background (setsid) and resumes from its
# checkpoint when started again with the same arguments; poll with `tail $RUN/train.log`.
#   RUN=/root/tiny-long MINUTES=13 INIT=old-6-layer.safetensors bash benchmarks/train_tiny_long.sh
set -euo pipefail
RUN=${RUN:-runs/tiny-long}
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1
setsid python3 -m spark3r.models.train_tiny --init "${INIT:?give INIT=the 6-layer weights}" \
    --frames 2 --max-frames 48 --frames-per-step 384 --path mixed --held-out synthetic:16:999:walk \
    --lr 3e-4 --warmup 200 --steps 100000 --minutes "${MINUTES:-13}" --eval-every 500 --checkpoint-every 250 \
    --log-every 100 --seed 1 --out "$RUN/vggt-tiny.safetensors" >>"$RUN/train.log" 2>&1 < /dev/null &
echo "training in the background: $RUN/train.log"
