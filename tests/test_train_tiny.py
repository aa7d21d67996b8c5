"""vggt-tiny training: targets and losses against float64 references, the training loop on CPU, the weights file, the
frame-only ablation patch and the held-out evaluation command."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.spatial.transform import Rotation

import spark3r
from spark3r.commands.train_tiny import main
from spark3r.data.clip import Clip
from spark3r.data.clips import write_clip
from spark3r.data.synthetic import SceneConfig, render_batch
from spark3r.errors import Spark3rError
from spark3r.models.blocks import patch_positions
from spark3r.models.geometry import pose_encoding_to_extrinsics_intrinsics
from spark3r.training.evaluation import clip_scores, frame_only_global_attention
from spark3r.training.losses import (
    camera_iterations, camera_loss, confidence_loss, dense_loss, gradient_loss, matrix_to_quaternion, pose_encoding,
    relative_pose_loss, scene_targets, training_loss,
)
from spark3r.training.steps import StepScenes, StepShape, render_step, train_spec_seed
from spark3r.training.tiny import (
    compile_model, grow_depth, learning_rate, parameter_groups, save_weights, scale_global_logits, split_head_channels,
    split_heads, trunk_depth,
)


@pytest.fixture(scope="module")
def clips():
    """Two rendered clips of 3 frames at 28 x 28 (float64 ground truth kept as rendered)."""
    return render_batch([11, 12], frames=3, height=28, width=28)


def test_matrix_to_quaternion_matches_scipy():
    rotations = Rotation.random(64, random_state=0).as_matrix()
    special = [np.eye(3), Rotation.from_rotvec([math.pi, 0, 0]).as_matrix(),
               Rotation.from_rotvec([0, math.pi * 0.999, 0]).as_matrix(), np.diag([-1.0, -1.0, 1.0])]
    matrices = np.concatenate([rotations, np.stack(special)])
    expected = Rotation.from_matrix(matrices).as_quat()  # xyzw
    expected *= np.where(expected[:, 3:] < 0, -1.0, 1.0)
    ours = matrix_to_quaternion(torch.from_numpy(matrices)).numpy()
    # a 180-degree rotation has w = 0, where q and -q are both valid: compare up to sign there
    assert np.allclose(np.abs((ours * expected).sum(-1)), 1.0, atol=1e-9)
    assert np.allclose(ours[:-3], expected[:-3], atol=1e-9)
    assert (ours[:, 3] >= 0).all()


def test_pose_encoding_round_trips_through_the_model_decoder(clips):
    extrinsics, intrinsics = clips.extrinsics.double(), clips.intrinsics.double()
    encoding = pose_encoding(extrinsics, intrinsics, (28, 28))
    decoded_extrinsics, decoded_intrinsics = pose_encoding_to_extrinsics_intrinsics(encoding, (28, 28))
    assert torch.allclose(decoded_extrinsics, extrinsics, atol=1e-9)
    assert torch.allclose(decoded_intrinsics, intrinsics, atol=1e-9)


def test_scene_targets_against_a_float64_reference(clips):
    targets = scene_targets(clips.depth, clips.intrinsics, clips.extrinsics)
    depth, intrinsics, extrinsics = (x.double().numpy() for x in (clips.depth, clips.intrinsics, clips.extrinsics))
    for b in range(2):
        to_4x4 = [np.vstack([e, [0, 0, 0, 1]]) for e in extrinsics[b]]
        relative = [e @ np.linalg.inv(to_4x4[0]) for e in to_4x4]
        points = []
        for s in range(3):
            rows, cols = np.meshgrid(np.arange(28) + 0.5, np.arange(28) + 0.5, indexing="ij")
            rays = np.stack([cols, rows, np.ones_like(rows)], -1) @ np.linalg.inv(intrinsics[b, s]).T
            camera = rays * depth[b, s][..., None]
            world = (camera - extrinsics[b, s][:, 3]) @ extrinsics[b, s][:, :3]
            points.append(world @ to_4x4[0][:3, :3].T + to_4x4[0][:3, 3])
        points = np.stack(points)
        scale = np.linalg.norm(points, axis=-1).mean()
        assert np.allclose(targets.points[b].numpy(), points / scale, atol=1e-4)
        assert np.allclose(targets.depth[b].numpy(), depth[b] / scale, atol=1e-5)
        assert np.allclose(targets.scale[b].item(), scale, rtol=1e-5)
        for s in range(3):
            assert np.allclose(targets.extrinsics[b, s, :, :3].numpy(), relative[s][:3, :3], atol=1e-5)
            assert np.allclose(targets.extrinsics[b, s, :, 3].numpy(), relative[s][:3, 3] / scale, atol=1e-5)
        fov = 2 * math.atan(14 / intrinsics[b, 0, 0, 0])
        assert np.allclose(targets.pose_enc[b, 0].numpy(), [0, 0, 0, 0, 0, 0, 1, fov, fov], atol=1e-5)
    assert targets.valid.all()


def test_confidence_and_gradient_losses_against_loops():
    generator = torch.Generator().manual_seed(0)
    pred = torch.randn(2, 5, 6, 3, generator=generator, dtype=torch.float64)
    target = torch.randn(2, 5, 6, 3, generator=generator, dtype=torch.float64)
    conf = 1 + torch.rand(2, 5, 6, generator=generator, dtype=torch.float64) * 3
    valid = torch.rand(2, 5, 6, generator=generator) > 0.3
    error = (pred - target).norm(dim=-1)
    terms = [conf[i] * error[i] - 0.2 * math.log(conf[i]) for i in np.ndindex(2, 5, 6) if valid[i]]
    assert math.isclose(confidence_loss(error, conf, valid).item(), (sum(terms) / len(terms)).item(), rel_tol=1e-12)
    scales = []
    for scale in range(3):
        step = 2**scale
        p, t, m = pred[:, ::step, ::step], target[:, ::step, ::step], valid[:, ::step, ::step]
        total = 0.0
        for n, i, j, c in np.ndindex(*p.shape):
            d = (p[n, i, j, c] - t[n, i, j, c]).item()
            if j + 1 < p.shape[2] and m[n, i, j] and m[n, i, j + 1]:
                total += abs((p[n, i, j + 1, c] - t[n, i, j + 1, c]).item() - d)
            if i + 1 < p.shape[1] and m[n, i, j] and m[n, i + 1, j]:
                total += abs((p[n, i + 1, j, c] - t[n, i + 1, j, c]).item() - d)
        scales.append(total / (m.sum().item() * 3))
    assert math.isclose(gradient_loss(pred, target, valid).item(), sum(scales) / 3, rel_tol=1e-10)


def test_camera_loss_weights_later_iterations_more():
    target = torch.zeros(1, 2, 9)
    first, last = torch.zeros(1, 2, 9), torch.zeros(1, 2, 9)
    first[..., 0], last[..., 7] = 1.0, 1.0  # translation error 1/3 on the first, FoV error 1/2 on the last iteration
    expected = (0.6 * (1 / 3) + 1.0 * 0.5 * (1 / 2)) / 2
    assert math.isclose(camera_loss([first, last], target).item(), expected, rel_tol=1e-6)


def random_pose_enc(seed: int, clips: int, frames: int, quaternion_scale: bool = False) -> torch.Tensor:
    """Random pose_enc [clips, frames, 9] in float64: scipy's random rotations (xyzw), translations and FoVs; with
    `quaternion_scale` the quaternions are scaled by random factors in [0.5, 2] (not unit, as the head predicts)."""
    rng = np.random.default_rng(seed)
    quaternions = Rotation.random(clips * frames, random_state=seed).as_quat().reshape(clips, frames, 4)
    if quaternion_scale:
        quaternions = quaternions * rng.uniform(0.5, 2.0, (clips, frames, 1))
    encoding = np.concatenate([rng.normal(size=(clips, frames, 3)), quaternions,
                               rng.uniform(0.5, 1.5, (clips, frames, 2))], axis=-1)
    return torch.from_numpy(encoding)


def relative_pose_reference(iterations: list[torch.Tensor], target: torch.Tensor, offsets, gamma=0.6) -> float:
    """relative_pose_loss by loops over iterations, offsets, clips and frame pairs, with scipy's rotations."""
    clips, frames = target.shape[:2]

    def relative(pose, b, i, j):
        first, second = (Rotation.from_quat(pose[b, k, 3:7].numpy()).as_matrix() for k in (i, j))
        rotation = second @ first.T
        return rotation, pose[b, j, :3].numpy() - rotation @ pose[b, i, :3].numpy()

    total = 0.0
    for index, pred in enumerate(iterations):
        per_offset = []
        for d in [d for d in offsets if d < frames]:
            chordal, translation = [], []
            for b in range(clips):
                for i in range(frames - d):
                    (pred_r, pred_t), (true_r, true_t) = relative(pred, b, i, i + d), relative(target, b, i, i + d)
                    chordal.append(np.sqrt(((pred_r - true_r) ** 2).sum()))
                    translation.append(np.abs(pred_t - true_t).mean())
            per_offset.append(np.mean(chordal) + np.mean(translation))
        total += gamma ** (len(iterations) - 1 - index) * np.mean(per_offset)
    return total / len(iterations)


def test_relative_pose_loss_is_zero_with_finite_gradients_for_the_truth():
    target = random_pose_enc(0, 2, 40)  # every default offset, up to 32, fits
    pred = target.clone().requires_grad_()
    loss = relative_pose_loss([pred, pred], target)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_relative_pose_loss_against_a_loop_reference():
    target = random_pose_enc(1, 2, 5)
    iterations = [random_pose_enc(seed, 2, 5, quaternion_scale=True) for seed in (2, 3, 4)]
    for offsets in ((1, 2, 4, 8, 16, 32), (1, 3)):
        expected = relative_pose_reference(iterations, target, offsets)
        assert math.isclose(relative_pose_loss(iterations, target, offsets).item(), expected, rel_tol=1e-12)


def test_relative_pose_loss_ignores_a_rigid_motion_of_the_predicted_world():
    target, pred = random_pose_enc(5, 2, 6), random_pose_enc(6, 2, 6, quaternion_scale=True)
    # world points x = A y + b: x_cam = R x + t = (R A) y + (t + R b)
    motion = Rotation.from_rotvec([0.3, -1.1, 0.7])
    shift = np.array([0.4, -2.0, 1.5])
    moved = pred.clone()
    for b, s in np.ndindex(2, 6):
        rotation = Rotation.from_quat(pred[b, s, 3:7].numpy())
        moved[b, s, 3:7] = torch.from_numpy((rotation * motion).as_quat())
        moved[b, s, :3] = pred[b, s, :3] + torch.from_numpy(rotation.as_matrix() @ shift)
    assert math.isclose(relative_pose_loss([moved], target).item(), relative_pose_loss([pred], target).item(),
                        rel_tol=1e-12)
    assert abs(camera_loss([moved], target).item() - camera_loss([pred], target).item()) > 0.1


def test_relative_pose_loss_by_hand():
    identity = torch.tensor([0.0, 0, 0, 0, 0, 0, 1, 1, 1], dtype=torch.float64).repeat(1, 3, 1)
    theta = 0.3
    rotated = identity.clone()
    rotated[0, 1, 5:7] = torch.tensor([math.sin(theta / 2), math.cos(theta / 2)], dtype=torch.float64)  # about z
    chordal = 2 * math.sqrt(2) * math.sin(theta / 2)
    # frame 1 rotated: offset 1: pairs (0, 1) and (1, 2) both rotate by theta -> the mean is `chordal`; offset 2:
    # (0, 2) -> 0; offsets 4.. unused -> chordal / 2 per iteration; iterations [rotated, truth] weighted 0.6 and 1,
    # averaged
    assert math.isclose(relative_pose_loss([rotated, identity], identity).item(), 0.6 * chordal / 2 / 2,
                        rel_tol=1e-12)
    moved = identity.clone()
    moved[0, 2, 2] = 3.0  # frame 2's translation only: offset 1: (1, 2) has L1 mean 1, (0, 1) 0; offset 2: 1
    assert math.isclose(relative_pose_loss([moved], identity).item(), (0.5 + 1.0) / 2, rel_tol=1e-12)


def test_training_loss_adds_the_relative_loss_only_with_its_weight(clips):
    targets = scene_targets(clips.depth, clips.intrinsics, clips.extrinsics)
    generator = torch.Generator().manual_seed(0)
    outputs = {"depth": targets.depth + 0.1 * torch.randn(targets.depth.shape, generator=generator),
               "depth_conf": 1 + torch.rand(targets.depth.shape, generator=generator),
               "points": targets.points + 0.1 * torch.randn(targets.points.shape, generator=generator),
               "points_conf": 1 + torch.rand(targets.depth.shape, generator=generator)}
    poses = [targets.pose_enc + 0.1 * torch.randn(targets.pose_enc.shape, generator=generator) for _ in range(4)]
    camera = camera_loss(poses, targets.pose_enc)
    depth = dense_loss(outputs["depth"][..., None], outputs["depth_conf"], targets.depth[..., None], targets.valid)
    points = dense_loss(outputs["points"], outputs["points_conf"], targets.points, targets.valid)
    loss, parts = training_loss(outputs, poses, targets, camera_weight=5.0)  # relative_weight defaults to 0
    assert torch.equal(loss, 5.0 * camera + depth + points)
    assert torch.equal(parts, torch.stack([camera, depth, points, torch.zeros(())]))
    relative = relative_pose_loss(poses, targets.pose_enc)
    weighted, parts = training_loss(outputs, poses, targets, camera_weight=5.0, relative_weight=0.5)
    assert relative > 0 and torch.allclose(weighted, loss + 0.5 * relative)
    assert torch.equal(parts, torch.stack([camera, depth, points, relative]))
    neighbours = relative_pose_loss(poses, targets.pose_enc, (1,))
    _, parts = training_loss(outputs, poses, targets, camera_weight=5.0, relative_weight=0.5, relative_offsets=(1,))
    assert neighbours != relative and parts[3] == neighbours


def test_learning_rate_warms_up_then_decays_to_five_percent():
    rates = [learning_rate(step, step / 100, 1e-3, warmup=10) for step in range(101)]
    assert rates[0] == pytest.approx(1e-4) and rates[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(rates[10:], rates[11:]))
    assert rates[100] == pytest.approx(5e-5)
    assert learning_rate(500, 0.5, 1e-3, warmup=10) == pytest.approx(1e-3 * (0.05 + 0.95 * 0.5))


def test_training_seeds_never_reach_held_out_specs():
    assert train_spec_seed(0, 0) == 10**9 and train_spec_seed(2, 5) == 3 * 10**9 + 5
    first = StepScenes(0, StepShape((2, 2), 2), (28, 28), SceneConfig())
    assert all(torch.equal(a, b) for a, b in zip(first[3].values(), first[3].values()))
    assert not torch.equal(first[3]["extrinsics"], first[4]["extrinsics"])


def test_camera_iterations_end_at_the_head_output(tiny):
    images = torch.rand(1, 2, 3, 28, 28)
    with torch.no_grad(), camera_iterations(tiny) as poses:
        outputs = tiny(images)
    assert len(poses) == tiny.camera_head.iterations
    assert torch.equal(poses[-1], outputs["pose_enc"])
    assert not torch.equal(poses[0], poses[-1])


def test_frame_only_attention_equals_attention_run_per_frame(tiny):
    attn = tiny.aggregator.global_blocks[2].attn
    layout = tiny.adapter.layout(torch.zeros(1, 3, 3, 28, 28))
    x = torch.randn(2, layout.tokens, tiny.config.embed_dim)
    pos = patch_positions(2, 2, layout.n_special)
    with torch.no_grad():
        dense = attn(x, pos=pos.repeat(3, 1)[None])
        with frame_only_global_attention(tiny, layout):
            patched = attn(x, pos=pos.repeat(3, 1)[None])
        per_frame = torch.cat([attn(chunk, pos=pos[None]) for chunk in x.split(layout.tokens_per_frame, dim=1)], 1)
        restored = attn(x, pos=pos.repeat(3, 1)[None])
    assert torch.allclose(patched, per_frame, atol=1e-5)
    assert not torch.allclose(patched, dense, atol=1e-3)
    assert torch.equal(restored, dense)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = spark3r.load_model("vggt-tiny", weights="none", seed=0).train()
    images, targets = render_step(StepScenes(0, StepShape((2, 2), 1), (28, 28), SceneConfig())[0], (28, 28),
                                     torch.device("cpu"))
    optimizer = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-3)
    losses = []
    for _ in range(20):
        with camera_iterations(model) as poses:
            outputs = model(images)
        loss, parts = training_loss(outputs, poses, targets, camera_weight=5.0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(value) for value in losses)
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3])


def test_scale_global_logits_multiplies_every_global_layers_logits_and_nothing_else():
    model = spark3r.load_model("vggt-tiny", weights="none", seed=3)
    with torch.no_grad():  # biases away from zero, so the bias must scale too
        for block in model.aggregator.global_blocks:
            block.attn.q_norm.bias.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    x = torch.randn(1, 10, model.aggregator.global_blocks[0].attn.qkv.in_features,
                    generator=torch.Generator().manual_seed(2))

    def global_logits() -> list[torch.Tensor]:
        out = []
        for block in model.aggregator.global_blocks:
            attn = block.attn
            heads = attn.qkv(x).reshape(1, 10, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).double()
            q = torch.nn.functional.layer_norm(heads[0], (attn.head_dim,), attn.q_norm.weight.double(),
                                               attn.q_norm.bias.double(), attn.q_norm.eps)
            k = torch.nn.functional.layer_norm(heads[1], (attn.head_dim,), attn.k_norm.weight.double(),
                                               attn.k_norm.bias.double(), attn.k_norm.eps)
            out.append(q @ k.transpose(-1, -2) / attn.head_dim ** 0.5)
        return out

    before, state = global_logits(), {key: value.clone() for key, value in model.state_dict().items()}
    scale_global_logits(model, 1.5)
    for old, new in zip(before, global_logits()):
        assert torch.allclose(new, 1.5 * old, rtol=1e-6, atol=1e-6)  # the gains are rounded to fp32 once
    changed = {key for key, value in model.state_dict().items() if not torch.equal(value, state[key])}
    assert changed == {f"aggregator.global_blocks.{index}.attn.q_norm.{part}" for index in range(12)
                       for part in ("weight", "bias")}


def test_init_logit_scale_scales_the_init_weights_once(tmp_path, capsys):
    init = tmp_path / "init.safetensors"
    save_weights(spark3r.load_model("vggt-tiny", weights="none", seed=4), init)
    out = tmp_path / "w.safetensors"
    args = ["--out", str(out), "--init", str(init), "--steps", "5", "--minutes", "1e-6", "--batch", "1", "--frames",
            "2", "--size", "28", "--held-out", "synthetic:1:999", "--device", "cpu", "--init-logit-scale", "2"]
    assert main(args) == 0  # the time limit stops it at step 0: the written weights are the scaled init
    start, written = load_file(init), load_file(out)
    gain = "aggregator.global_blocks.5.attn.q_norm.weight"
    assert torch.equal(written[gain], start[gain] * 2)  # x2 is exact in fp16
    assert torch.equal(written["aggregator.global_blocks.5.attn.k_norm.weight"],
                       start["aggregator.global_blocks.5.attn.k_norm.weight"])
    assert main(args) == 0  # resumed from its checkpoint at step 0: not scaled again
    assert torch.equal(load_file(out)[gain], start[gain] * 2)
    assert "resuming" in capsys.readouterr().err


def test_training_writes_strictly_loadable_fp16_weights_and_resumes(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    args = ["--out", str(out), "--batch", "1", "--frames", "2", "--size", "28", "--log-every", "1",
            "--eval-every", "2", "--held-out", "synthetic:1:999", "--device", "cpu"]
    assert main(["--steps", "2", *args]) == 0
    first = capsys.readouterr().out
    assert "step 2/2" in first and "eval step 2" in first and f"wrote {out}" in first
    state = load_file(out)
    assert all(value.dtype == torch.float16 for value in state.values())
    assert out.stat().st_size < 15 * 2**20
    loaded = spark3r.load_model("vggt-tiny", weights=out)
    assert all(torch.equal(loaded.state_dict()[key], value.float()) for key, value in state.items())

    assert main(["--steps", "3", *args]) == 0
    second = capsys.readouterr()
    assert "resuming" in second.err and "step 3/3" in second.out and "step 1/" not in second.out
    assert torch.load(out.with_suffix(".ckpt.pt"), weights_only=True)["step"] == 3
    assert main(["--steps", "3", *args[:2], "--batch", "2", *args[4:]]) == 2
    assert "was made with --batch 1, not 2" in capsys.readouterr().err
    assert main(["--steps", "3", *args, "--relative-weight", "0.5"]) == 2
    assert "was made with --relative-weight 0.0, not 0.5" in capsys.readouterr().err
    assert main(["--steps", "3", *args, "--relative-offsets", "1,64"]) == 2
    assert "was made with --relative-offsets (1, 2, 4, 8, 16, 32), not (1, 64)" in capsys.readouterr().err


def test_time_limit_stops_cleanly_and_still_writes_weights(tmp_path, capsys):
    out = tmp_path / "tiny.safetensors"
    assert main(["--out", str(out), "--steps", "100", "--minutes", "1e-6", "--batch", "1", "--frames", "2",
                    "--size", "28", "--held-out", "synthetic:1:999", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "time limit of 1e-06 min reached at step 0" in printed and "after 0 steps" in printed
    assert out.exists() and torch.load(out.with_suffix(".ckpt.pt"), weights_only=True)["step"] == 0


def test_training_compiles_its_blocks_with_dynamic_shapes_and_leaves_the_heads_eager(monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, **options: compiled.append((module, options)))
    model = spark3r.load_model("vggt-tiny", weights="none")
    compile_model(model)
    depth = len(model.aggregator.frame_blocks)
    assert len(compiled) == 2 * depth + len(model.camera_head.trunk)
    assert not {id(module) for module, _ in compiled} & {id(model.depth_head), id(model.point_head)}
    assert all(options == {"dynamic": True} for _, options in compiled)


def test_training_with_the_relative_loss_logs_it(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "w.safetensors"), "--steps", "1", "--batch", "1", "--frames", "2", "--size",
                 "28", "--held-out", "synthetic:1:999", "--device", "cpu", "--log-every", "1",
                 "--relative-weight", "0.5", "--relative-offsets", "1,64"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("step 1/1"))
    relative = float(line.split(" relative ")[1].split(")")[0])
    assert math.isfinite(relative) and relative > 0
    settings = torch.load(tmp_path / "w.ckpt.pt", weights_only=True)["settings"]
    assert settings["relative_weight"] == 0.5 and settings["relative_offsets"] == (1, 64)


def test_head_dtype_reaches_the_training_decode_and_not_the_evaluation(tmp_path, capsys, monkeypatch):
    from spark3r.models.vggt import VGGT
    seen, decode = [], VGGT.decode

    def recording(self, state, images, head_dtype=torch.float32):
        seen.append((self.training, head_dtype))
        return decode(self, state, images, head_dtype)

    monkeypatch.setattr(VGGT, "decode", recording)
    assert main(["--out", str(tmp_path / "w.safetensors"), "--steps", "1", "--batch", "1", "--frames", "2", "--size",
                 "28", "--held-out", "synthetic:1:999", "--device", "cpu", "--dtype", "bf16", "--head-dtype",
                 "compute"]) == 0
    assert "step 1/1" in capsys.readouterr().out
    assert (True, torch.bfloat16) in seen and (False, torch.bfloat16) not in seen


@pytest.mark.parametrize("bad, message", [
    (["--frames", "1"], "at least 2 frames"),
    (["--out", "tiny.pt"], "must name a .safetensors file"),
    (["--size", "30"], "not a multiple of the patch size"),
    (["--held-out", f"synthetic:2:{10**9 + 1}"], "uses a training seed"),
    (["--arc-share", "0.25"], "--arc-share 0.25 needs --path mixed"),
    (["--path", "mixed", "--arc-share", "1.5"], "a share between 0 and 1"),
    (["--relative-weight", "-1"], "--relative-weight is -1.0: give a weight >= 0"),
    (["--relative-weight", "nan"], "--relative-weight is nan: give a weight >= 0"),
    (["--relative-offsets", "1,0"], "--relative-offsets is (1, 0): give frame offsets >= 1"),
    (["--relative-offsets", "1,x"], "--relative-offsets 1,x: give whole frame offsets"),
    (["--init-logit-scale", "0"], "--init-logit-scale is 0.0: give a factor > 0"),
    (["--init-logit-scale", "nan"], "--init-logit-scale is nan: give a factor > 0"),
])
def test_bad_training_settings_exit_2_with_one_sentence(tmp_path, capsys, bad, message):
    args = ["--out", str(tmp_path / "w.safetensors"), "--steps", "1", "--batch", "1", "--frames", "2", "--size", "28",
            "--device", "cpu"]
    assert main(args + bad) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_clip_scores_of_perfect_and_identity_cameras(clips):
    targets = scene_targets(clips.depth, clips.intrinsics, clips.extrinsics)
    gt = targets.extrinsics[0].double()
    perfect = clip_scores(targets.depth[0] * 3.0, gt.float(), targets, 0)
    assert perfect["abs_rel"] < 1e-6 and perfect["delta_1.25"] == 1.0
    assert perfect["rotation_deg"] < 0.1 and perfect["translation"] < 1e-4 and perfect["ate"] < 1e-4
    assert perfect["auc30"] > 0.95
    trivial = clip_scores(torch.ones(3, 28, 28), None, targets, 0)
    angles = [math.degrees(math.acos(np.clip((np.trace(gt[s, :, :3].numpy()) - 1) / 2, -1, 1))) for s in (1, 2)]
    assert trivial["rotation_deg"] == pytest.approx(np.mean(angles), abs=1e-4)  # float32 targets: not exactly orthonormal
    assert trivial["translation"] == pytest.approx(gt[1:, :, 3].norm(dim=-1).mean().item(), abs=1e-6)
    assert trivial["auc30"] == 0.0
    depth = targets.depth[0].double().numpy()
    constant = np.median(depth)
    assert trivial["abs_rel"] == pytest.approx(np.mean(np.abs(constant - depth) / depth), rel=1e-6)


def test_evaluate_command_prints_the_three_rows(capsys):
    assert main(["--evaluate", "none", "--clips", "synthetic:2:1000", "--frames", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    for label in ("model", "model, frame-only global attention", "constant depth / identity cameras",
                  "frame-only / model pose error"):
        assert label in out
    assert main(["--evaluate", "none", "--clips", "synthetic:2:1000", "--frames", "2", "--device", "cpu",
                    "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == [2] and report["lengths"]["2"]["count"] == 2
    assert set(report["lengths"]["2"]["results"]) == {"model", "frame_only", "trivial"}
    assert report["lengths"]["2"]["results"]["trivial"]["auc30"] == 0.0


def test_evaluate_refuses_clips_without_ground_truth(tmp_path, capsys):
    write_clip(Clip(name="plain", images=torch.rand(2, 3, 112, 112)), tmp_path, "npz")
    assert main(["--evaluate", "none", "--clips", str(tmp_path), "--device", "cpu"]) == 2
    assert "has no ground-truth depth and cameras" in capsys.readouterr().err


def test_variable_length_steps_stay_in_range_fill_the_frame_budget_and_repeat():
    shape = StepShape((2, 48), clips=48, frames_per_step=384, path="mixed")
    drawn = [shape.at(train_spec_seed(0, step)) for step in range(400)]
    assert drawn == [shape.at(train_spec_seed(0, step)) for step in range(400)]
    lengths = [frames for frames, _, _ in drawn]
    assert min(lengths) == 2 and max(lengths) == 48 and len(set(lengths)) == 47
    assert all(clips == 384 // frames for frames, clips, _ in drawn)
    assert all(path == "walk" for frames, _, path in drawn if frames > 16)
    short_paths = [path for frames, _, path in drawn if frames <= 16]
    assert 0.3 < short_paths.count("arc") / len(short_paths) < 0.7
    assert StepShape((8, 8), clips=6).at(123) == (8, 6, "arc")
    shared = StepShape((2, 256), clips=1, frames_per_step=1024, path="mixed", arc_share=0.25)
    drawn = [shared.at(train_spec_seed(0, step)) for step in range(800)]
    arcs = [frames for frames, _, path in drawn if path == "arc"]
    walks = [frames for frames, _, path in drawn if path == "walk"]
    assert 0.2 < len(arcs) / len(drawn) < 0.3 and max(arcs) <= 16 and max(walks) > 200 and min(walks) <= 16
    assert all(clips == 1024 // frames for frames, clips, _ in drawn)
    assert StepShape((2, 48), 48, 384, "mixed").at(train_spec_seed(0, 5)) == shape.at(train_spec_seed(0, 5))
    arrays = StepScenes(0, StepShape((2, 5), 1, frames_per_step=10, path="walk"), (28, 28), SceneConfig())[7]
    frames, clips, _ = StepShape((2, 5), 1, frames_per_step=10, path="walk").at(train_spec_seed(0, 7))
    assert arrays["extrinsics"].shape == (clips, frames, 3, 4)


def test_grown_trunk_computes_the_same_function_with_its_taps_moved():
    from dataclasses import replace

    from spark3r.models.blocks import init_weights
    from spark3r.models.vggt import VGGT, VGGT_TINY

    torch.manual_seed(0)
    small = VGGT(replace(VGGT_TINY, depth=4, taps=(0, 1, 2, 3), init_values=0.5)).eval()
    init_weights(small)
    for name, value in small.named_parameters():  # LayerScale far from zero, so a wrong tap or copy shows
        if name.endswith("gamma"):
            value.data.uniform_(0.3, 0.8)
    grown_state = grow_depth(small.state_dict(), 8)
    assert trunk_depth(grown_state) == 8
    for new in (2, 3):  # a silent copy of old block 1, then old block 1
        assert torch.equal(grown_state[f"aggregator.global_blocks.{new}.attn.qkv.weight"],
                           small.state_dict()["aggregator.global_blocks.1.attn.qkv.weight"])
    assert not grown_state["aggregator.global_blocks.2.ls1.gamma"].any()
    assert grown_state["aggregator.global_blocks.3.ls1.gamma"].min() >= 0.3
    big = VGGT(replace(VGGT_TINY, depth=8, taps=(1, 3, 5, 7), init_values=0.5)).eval()  # tap t -> 2 (t + 1) - 1
    big.load_state_dict(grown_state)
    images = torch.rand(1, 3, 3, 28, 28)
    with torch.no_grad():
        expected, grown = small(images), big(images)
    for key in ("depth", "points", "pose_enc"):
        assert torch.allclose(grown[key], expected[key], atol=1e-6), key
    with pytest.raises(Spark3rError, match="whole multiple of 4"):
        grow_depth(small.state_dict(), 6)


def test_split_head_channels_by_hand():
    # one head of 8 channels (y first, y second, x first, x second; 2 frequencies each) -> two heads of 4: sub-head 0
    # takes frequency 0 of each quarter, sub-head 1 frequency 1
    assert split_head_channels(8, 8, 4).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    # two heads of 16 -> four of 8: head 1's channels follow head 0's, offset by 16
    order = split_head_channels(32, 16, 8).tolist()
    assert order[:8] == [0, 2, 4, 6, 8, 10, 12, 14] and order[8:16] == [1, 3, 5, 7, 9, 11, 13, 15]
    assert order[16:] == [16 + c for c in order[:16]]


def test_split_heads_keeps_rope_pairs_and_a_uniform_attention():
    from dataclasses import replace

    from spark3r.models.blocks import RotaryPositionEmbedding2D, init_weights
    from spark3r.models.vggt import VGGT, VGGT_TINY

    torch.manual_seed(0)
    two = VGGT(replace(VGGT_TINY, depth=2, taps=(0, 1, 1, 1), num_heads=2)).eval()
    init_weights(two)
    state = two.state_dict()
    for key in state:  # qk-norm weights and biases zero: every logit is zero, every head's attention uniform
        if "_norm." in key and ".attn." in key:
            state[key] = torch.zeros_like(state[key])
    four = VGGT(replace(VGGT_TINY, depth=2, taps=(0, 1, 1, 1), num_heads=4)).eval()
    four.load_state_dict(split_heads(state, 32))
    two.load_state_dict(state)
    images = torch.rand(1, 3, 3, 28, 28)
    with torch.no_grad():
        expected, split = two(images), four(images)
    for key in ("depth", "points", "pose_enc"):  # v and the projection's inputs reordered alike
        assert torch.allclose(split[key], expected[key], atol=1e-5, rtol=1e-5), key

    # RoPE on the old heads, then reordered, against reordering and RoPE on the new heads
    rope, order = RotaryPositionEmbedding2D(100.0), split_head_channels(128, 64, 32)
    pos = patch_positions(4, 4, 5)
    q = torch.randn(1, 2, len(pos), 64, dtype=torch.float64)
    old_then_split = rope(q, pos).permute(0, 2, 1, 3).flatten(2)[..., order].unflatten(2, (4, 32)).permute(0, 2, 1, 3)
    split_then_new = rope(q.permute(0, 2, 1, 3).flatten(2)[..., order].unflatten(2, (4, 32)).permute(0, 2, 1, 3), pos)
    assert torch.allclose(old_then_split[:, ::2], split_then_new[:, ::2])  # sub-head 0: the same frequencies
    assert not torch.allclose(old_then_split[:, 1::2], split_then_new[:, 1::2])  # sub-head 1: faster ones
    pair_norm = lambda x: x.unflatten(-1, (2, 2, 8)).square().sum(-2)  # (first, second) of each axis and frequency
    assert torch.allclose(pair_norm(old_then_split), pair_norm(split_then_new))  # rotations of the same pairs
    with pytest.raises(Spark3rError, match="multiple of 4"):
        split_heads(state, 6)


def test_evaluate_reports_every_length(capsys):
    assert main(["--evaluate", "none", "--clips", "synthetic:1:1000:walk", "--frames", "2,3", "--device", "cpu",
                    "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["frames"] == [2, 3] and set(report["lengths"]) == {"2", "3"}
    assert main(["--evaluate", "none", "--frames", "2,x", "--device", "cpu"]) == 2
    assert "at least 2 frames" in capsys.readouterr().err


def test_evaluation_renders_synthetic_clips_on_its_device(monkeypatch):
    import spark3r.training.evaluation as evaluation

    asked, original = [], evaluation.open_clips

    def recording(spec, **options):
        asked.append(options["device"])
        return original(spec, **options)

    monkeypatch.setattr(evaluation, "open_clips", recording)
    model = spark3r.load_model("vggt-tiny", weights="none")
    report = evaluation.evaluate_lengths(model, "synthetic:1:1000:walk", [2], torch.device("cpu"))
    assert asked == [torch.device("cpu")] and report[2]["count"] == 1
