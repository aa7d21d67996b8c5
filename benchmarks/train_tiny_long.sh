#!/usr/bin/env bash
# The long-clip vggt-tiny, trained in stages in the background (setsid); each stage resumes from its checkpoint when
# started again with the same settings; poll with `tail $RUN/train.log`.
# Stage 1: the 6 + 6 model of commit 189e6d8 grown to 12 + 12 blocks (identity copies, so training starts from the
# old model's function), trained on clips of 2-48 frames (walks, and arcs for half of the steps of at most 16 frames),
# 384 frames per step:
#   RUN=/root/tiny-long MINUTES=13 INIT=old-6-layer.safetensors bash benchmarks/train_tiny_long.sh
# Stage 2: from stage 1's weights (the shipped ones), clips of 2-256 frames, 1024 frames per step:
#   RUN=/root/tiny-long-256 MINUTES=11 INIT=spark3r/weights/vggt-tiny.safetensors MAX_FRAMES=256 \
#       FRAMES_PER_STEP=1024 LR=2e-4 WARMUP=100 SEED=2 bash benchmarks/train_tiny_long.sh
# Stage 3 (not shipped; benchmarks/results/train-vggt-tiny-long.md): from stage 2's weights, a quarter of the steps
# short arcs; its weights were benchmarks/checkpoints/vggt-tiny-long-stage3.safetensors (commit aa3f305):
#   RUN=/root/h2 MINUTES=15 INIT=spark3r/weights/vggt-tiny.safetensors MAX_FRAMES=256 FRAMES_PER_STEP=1024 LR=3e-4 \
#       WARMUP=100 SEED=3 ARC_SHARE=0.25 bash benchmarks/train_tiny_long.sh
# Stage 4 (not shipped yet), from stage 3's weights, bf16 DPT heads and compiled blocks, on an H100 (commit 9360db2);
# its weights were benchmarks/checkpoints/vggt-tiny-long-stage4.safetensors (in commit 2d28945's tree):
#   RUN=/root/s4 MINUTES=10 INIT=benchmarks/checkpoints/vggt-tiny-long-stage3.safetensors MAX_FRAMES=256 \
#       FRAMES_PER_STEP=1024 LR=3e-4 WARMUP=100 SEED=4 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 \
#       bash benchmarks/train_tiny_long.sh
# Stage 5, from stage 4's weights with a new seed and the relative-pose loss, ran 7 min on one H100 at commit 6c62ecf
# (results/train-vggt-tiny-long-s5.log; its first try, at commit d5890dc, stopped at step 0 compiling the DPT heads
# with dynamic shapes: results/train-vggt-tiny-long-s5-crash.log). Sharper global attention (INIT_LOGIT_SCALE, against
# stage 4's attention diluted over long clips) is left out: it helped the first 32 frames of a long clip but not the
# whole clip, untrained or after a 120-step probe (results/attention-vggt-tiny-long.md,
# eval-vggt-tiny-long-s4-logits-x1.7.json, eval-logit-probe-x*.json):
#   RUN=/root/s5 MINUTES=7 INIT=benchmarks/checkpoints/vggt-tiny-long-stage4.safetensors MAX_FRAMES=256 \
#       FRAMES_PER_STEP=1024 LR=3e-4 WARMUP=100 SEED=5 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 \
#       RELATIVE_WEIGHT=5 bash benchmarks/train_tiny_long.sh
# Stage 6: stage 5's weights with the relative-pose loss reaching pairs 64 and 128 frames apart, for the drift from
# frame 0 that stage 5 left at 256 frames (results/drift-vggt-tiny-long-s5-256.md: frames 90-106 degrees from frame 0,
# long-range chaining); stage 5 itself had plateaued (22.1 -> 23.8 degrees at 256 frames over its last 1000 steps):
# (ran at commit 2d28945 on one H100: 8 min, then resumed with MINUTES=11.3; its weights are
# benchmarks/checkpoints/vggt-tiny-long-stage6.safetensors, results/train-vggt-tiny-long.md):
#   RUN=/root/s6 MINUTES=8 INIT=benchmarks/checkpoints/vggt-tiny-long-stage5.safetensors MAX_FRAMES=256 \
#       FRAMES_PER_STEP=1024 LR=3e-4 WARMUP=100 SEED=6 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 \
#       RELATIVE_WEIGHT=5 RELATIVE_OFFSETS=1,2,4,8,16,32,64,128 bash benchmarks/train_tiny_long.sh
# Stage 7: stage 6's weights trained on with stage 6's settings, a new seed and a lower peak learning rate, 12 min on
# one H100 at commit c6bac26 (results/train-vggt-tiny-long-s7.log; its weights are
# benchmarks/checkpoints/vggt-tiny-long-stage7.safetensors; stage 5's left the tree, they are in commit a37238a's):
#   RUN=/root/s7 MINUTES=12 INIT=benchmarks/checkpoints/vggt-tiny-long-stage6.safetensors MAX_FRAMES=256 \
#       FRAMES_PER_STEP=1024 LR=2e-4 WARMUP=100 SEED=7 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 \
#       RELATIVE_WEIGHT=5 RELATIVE_OFFSETS=1,2,4,8,16,32,64,128 bash benchmarks/train_tiny_long.sh
# Stage 8: stage 7's weights trained on with its settings, a new seed and a peak learning rate of 1.5e-4, 11 min on
# one H100 at commit a84dfe5 (results/train-vggt-tiny-long-s8.log; its weights are the shipped ones since 7c096a7,
# spark3r/weights/vggt-tiny.safetensors; stage 6's left the tree, they are in commit 86b5d36's):
#   RUN=/root/s8 MINUTES=11 INIT=benchmarks/checkpoints/vggt-tiny-long-stage7.safetensors MAX_FRAMES=256 \
#       FRAMES_PER_STEP=1024 LR=1.5e-4 WARMUP=100 SEED=8 ARC_SHARE=0.25 HEAD_DTYPE=compute COMPILE=1 \
#       RELATIVE_WEIGHT=5 RELATIVE_OFFSETS=1,2,4,8,16,32,64,128 bash benchmarks/train_tiny_long.sh
# ARC_SHARE=0.25 makes a quarter of the steps short arcs (stage 2 had arcs in 3% of its steps and lost them).
# HEAD_DTYPE=compute runs the DPT heads under autocast to the trunk's bf16 in training (default fp32, as upstream).
# COMPILE=1 compiles the transformer blocks (train_tiny --compile; the DPT heads stay eager).
# RELATIVE_WEIGHT=W adds W times the relative-pose loss of frame pairs (train_tiny --relative-weight; default 0: off;
# a resumed stage must keep the same W).
# RELATIVE_OFFSETS=D1,D2,... sets the frame offsets of those pairs (train_tiny --relative-offsets; default 1,2,...,32).
# INIT_LOGIT_SCALE=T multiplies INIT's global attention logits by T before training (train_tiny --init-logit-scale):
# sharper attention over long clips (tiny_attention.py --logit-scale measures it on trained weights).
# WORKERS=N sets the scene-sampling workers (default up to 8; give fewer when two runs share the machine).
set -euo pipefail
RUN=${RUN:-runs/tiny-long}
mkdir -p "$RUN"
export PYTHONUNBUFFERED=1
setsid python3 -m spark3r.commands.train_tiny --init "${INIT:?give INIT=the weights to start from}" \
    --frames 2 --max-frames "${MAX_FRAMES:-48}" --frames-per-step "${FRAMES_PER_STEP:-384}" --path mixed \
    --held-out synthetic:16:999:walk --lr "${LR:-3e-4}" --warmup "${WARMUP:-200}" --steps 100000 \
    --minutes "${MINUTES:-13}" --eval-every 500 --checkpoint-every 250 --log-every 100 --seed "${SEED:-1}" \
    ${ARC_SHARE:+--arc-share "$ARC_SHARE"} ${HEAD_DTYPE:+--head-dtype "$HEAD_DTYPE"} ${COMPILE:+--compile} \
    --relative-weight "${RELATIVE_WEIGHT:-0}" ${RELATIVE_OFFSETS:+--relative-offsets "$RELATIVE_OFFSETS"} \
    --init-logit-scale "${INIT_LOGIT_SCALE:-1}" ${WORKERS:+--workers "$WORKERS"} --out "$RUN/vggt-tiny.safetensors" >>"$RUN/train.log" 2>&1 < /dev/null &
echo "training in the background: $RUN/train.log"
