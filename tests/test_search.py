"""search-schedule: objective, exact knapsack, Optuna study (constraints, resume, workers, seeds), CLI and export."""
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import optuna
import pytest
import torch

from spark3r.errors import Spark3rError
from spark3r.models.base import BlockGroup, FlopConfig
from spark3r.models.registry import build_model
from spark3r.profiler.format import MetricTable, Profile, save_profile
from spark3r.profiler.run import ProfileOptions
from spark3r.reduce.flops import global_attention_fraction, model_fraction
from spark3r.schedule import apply_schedule, check_model, load_schedule
from spark3r.commands.search_schedule import main
from spark3r.search.knapsack import pareto_front, solve_knapsack
from spark3r.search.problem import (
    Candidate, SearchProblem, build_problem, interpolate, kv_levels, predicted_deviation,
)
from spark3r.search.study import (
    CONSTRAINT, WARM_START, completed, is_feasible, join_study, make_sampler, open_study,
    ranked_candidates, run_study,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)
TINY_FLOPS = FlopConfig(layout_n_special=5, tokens_per_frame=69, other_flops_per_frame=1e9, patch_grid=(8, 8),
                        groups=(BlockGroup("frame", 6, 256, 1024, "frame", 69),
                                BlockGroup("global", 6, 256, 1024, "global", 69)))


def synthetic_profile(layers=6, kv_keep=(1.0, 0.5, 0.25, 0.125), query_merge=(1, 2, 3, 4), seed=0,
                      model="vggt-tiny", weights="auto", frames=8):
    """Per-layer sensitivities spread 30x (as the tiny prototype measured), deviation convex in log(reduction),
    queries about 3x as sensitive as K/V at the same token reduction."""
    rng = np.random.default_rng(seed)
    sensitivity = np.exp(rng.uniform(np.log(0.001), np.log(0.03), layers))

    def tables(reduction, scale):
        noise = rng.uniform(0.8, 1.2, (layers, len(reduction)))
        mean = sensitivity[:, None] * scale * reduction[None, :] ** 1.6 * noise
        mean[:, reduction == 0] = 0.0
        return {"score": MetricTable(mean, mean / 4, mean / 8), "depth": MetricTable(mean / 2, mean / 8, mean / 16)}

    return Profile(model=model, global_layers=layers, frames=frames, image_hw=(112, 112),
                   layout={"n_special": 5, "grid_h": 8, "grid_w": 8},
                   clips=[{"name": "synthetic-0", "sha256": "0" * 64, "frames": frames}],
                   options={"kv_method": "frame_stride", "keep_reference_frame": True, "group_frames": 20,
                            "weights": weights},
                   kv_keep=list(kv_keep), query_merge=list(query_merge), metrics=["score", "depth"],
                   kv=tables(np.log2(1 / np.asarray(kv_keep)), 1.0),
                   query=tables(np.log2(np.asarray(query_merge, dtype=float)), 3.0))


def realistic_problem(per_layer_query=False):
    """24 global layers and 6 K/V levels down to 1/32, as for VGGT-1B."""
    flops = FlopConfig(layout_n_special=5, tokens_per_frame=69, other_flops_per_frame=1e9, patch_grid=(8, 8),
                       groups=(BlockGroup("frame", 24, 1024, 4096, "frame", 69),
                               BlockGroup("global", 24, 1024, 4096, "global", 69)))
    profile = synthetic_profile(layers=24, kv_keep=(1.0, 0.5, 0.25, 0.125, 0.0625, 1 / 32), seed=1, model="vggt-1b")
    return build_problem(profile, flops, per_layer_query=per_layer_query)


# ------------------------------------------------------------------------------------------------------ objective


def test_interpolation_is_linear_in_log_level_and_clamped():
    table = np.array([[0.0, 1.0, 3.0], [0.0, 2.0, 2.0]])
    levels = [1.0, 0.5, 0.125]
    at = [1.0, 0.5 ** 0.5, 0.25, 0.125, 0.01, 2.0]
    expected = np.array([[0.0, 0.5, 1.0 + 2.0 * (1 / 2), 3.0, 3.0, 0.0],  # log2(0.25) is 1/2 of the way .5 -> .125
                         [0.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    np.testing.assert_allclose(interpolate(table, levels, at), expected, atol=1e-12)
    np.testing.assert_allclose(interpolate(table[:, [2, 0, 1]], [0.125, 1.0, 0.5], at), expected, atol=1e-12)


def test_kv_levels_add_interpolated_ones():
    assert kv_levels([1.0, 0.5, 0.125], 0, "frame_stride") == (1.0, 0.5, 0.125)
    assert kv_levels([1.0, 0.5, 0.125], 1, "frame_stride") == (1.0, 0.5, 0.25, 0.125)  # 1/sqrt(2) snaps to 1
    levels = kv_levels([1.0, 0.5, 0.125], 1, "random")
    np.testing.assert_allclose(levels, [1.0, 0.5 ** 0.5, 0.5, 0.25, 0.125])


@pytest.mark.parametrize("budget_of, fraction", [("global_attention", global_attention_fraction),
                                                 ("model", model_fraction)])
@pytest.mark.parametrize("frames", [8, 300])
def test_problem_matches_flop_model_and_profile_sums(budget_of, fraction, frames):
    profile = synthetic_profile()
    problem = build_problem(profile, TINY_FLOPS, frames=frames, budget_of=budget_of, per_layer_query=True)
    rng = np.random.default_rng(0)
    for _ in range(5):
        candidate = Candidate(tuple(rng.integers(0, 4, 6).tolist()), tuple(rng.integers(0, 4, 6).tolist()))
        reference = fraction(TINY_FLOPS, frames, problem.reductions(candidate))
        assert problem.flops_fraction(candidate) == pytest.approx(reference, rel=1e-12)
        deviation = sum(profile.kv["score"].mean[layer, profile.kv_keep.index(problem.kv_keep[j])]
                        + profile.query["score"].mean[layer, profile.query_merge.index(problem.query_merge[k])]
                        for layer, (j, k) in enumerate(zip(candidate.kv, candidate.query)))
        assert problem.deviation(candidate) == pytest.approx(deviation, rel=1e-12)
    assert problem.flops_fraction(problem.uniform(0, 0)) == pytest.approx(1.0)


def test_predicted_deviation_of_a_schedule_resolves_at_profile_frames():
    profile = synthetic_profile(layers=12)
    rule = load_schedule("schedules/vggt-tiny-paper.yaml")  # at 8 frames: keep 1 on layers 6-8, 1/3 elsewhere
    one_third = interpolate(profile.kv["score"].mean, profile.kv_keep, [1 / 3])[:, 0]
    expected = sum(one_third[layer] for layer in (0, 1, 2, 3, 4, 5, 9, 10, 11))
    assert predicted_deviation(profile, rule) == pytest.approx(expected, rel=1e-12)
    # at 300 frames: keep 1/8 on layers 6-8 and 1/24 (below the profile's 1/8: its end value) elsewhere, merge 2
    at_300 = profile.kv["score"].mean[:, 3].sum() + profile.query["score"].mean[:, 1].sum()
    assert predicted_deviation(profile, rule, frames=300) == pytest.approx(at_300, rel=1e-12)
    with pytest.raises(Spark3rError, match="profile for vggt-1b"):
        predicted_deviation(synthetic_profile(model="vggt-1b", layers=12), rule)


# ------------------------------------------------------------------------------------------------------ knapsack


def brute_force(problem, budget):
    queries = (itertools.product(range(len(problem.query_merge)), repeat=problem.global_layers)
               if problem.per_layer_query else [(k,) * problem.global_layers for k in range(len(problem.query_merge))])
    best = np.inf
    for query in queries:
        for kv in itertools.product(range(len(problem.kv_keep)), repeat=problem.global_layers):
            candidate = Candidate(kv, tuple(query))
            if problem.flops_fraction(candidate) <= budget:
                best = min(best, problem.deviation(candidate))
    return best


@pytest.mark.parametrize("per_layer_query", [False, True])
def test_knapsack_is_the_exact_optimum(per_layer_query):
    flops = FlopConfig(layout_n_special=5, tokens_per_frame=69, other_flops_per_frame=1e9, patch_grid=(8, 8),
                       groups=(BlockGroup("global", 4, 256, 1024, "global", 69),))
    for seed in range(2):
        profile = synthetic_profile(layers=4, query_merge=(1, 2, 4), seed=seed)
        problem = build_problem(profile, flops, per_layer_query=per_layer_query)
        for budget in (0.07, 0.2, 0.33, 0.5, 1.0):
            result = solve_knapsack(problem.within(budget))
            assert result.exact and result.flops_fraction <= budget
            assert result.deviation == pytest.approx(brute_force(problem, budget), rel=1e-12)


def test_budget_below_the_cheapest_schedule_is_refused():
    problem = build_problem(synthetic_profile(), TINY_FLOPS)
    cheapest = problem.flops_fraction(problem.cheapest())
    assert solve_knapsack(problem.within(cheapest)).candidate == problem.cheapest()
    with pytest.raises(Spark3rError, match="below the cheapest schedule"):
        solve_knapsack(problem.within(cheapest * 0.99))


def test_pareto_front_is_monotone_and_bounds_the_optimum():
    problem = build_problem(synthetic_profile(), TINY_FLOPS, per_layer_query=True)
    front = pareto_front(problem)
    fractions, deviations = np.array([p[0] for p in front]), np.array([p[1] for p in front])
    assert (np.diff(fractions) > 0).all() and (np.diff(deviations) < 0).all()
    for fraction, deviation, candidate in front[:: max(1, len(front) // 8)]:
        assert problem.flops_fraction(candidate) == fraction
        assert solve_knapsack(problem.within(fraction)).deviation <= deviation + 1e-12


# ------------------------------------------------------------------------------------------------------ study


def in_memory_run(problem, budget, trials, sampler="mutation", seed=0, warm=True, study=None):
    study = study or optuna.create_study(direction="minimize")
    warm_start = solve_knapsack(problem.within(budget)).candidate if warm else None
    run_study(study, problem.within(budget), trials, make_sampler(sampler, seed), "w0", warm_start=warm_start,
              progress=False)
    return study


@pytest.mark.parametrize("sampler, trials", [("mutation", 300), ("tpe", 80), ("nsga2", 120), ("gp", 12)])
def test_every_trial_sets_the_constraint_and_the_feasible_flag_is_right(sampler, trials):
    problem = build_problem(synthetic_profile(), TINY_FLOPS, per_layer_query=sampler == "mutation")
    budget = 0.3
    study = in_memory_run(problem, budget, trials, sampler)
    done = completed(study)
    assert len(done) == trials
    feasible = []
    for trial in done:
        fraction = problem.flops_fraction(problem.candidate(trial.params))
        assert trial.constraints[CONSTRAINT] == pytest.approx(fraction - budget, abs=1e-15)
        assert is_feasible(trial) == (fraction <= budget)
        feasible.append(is_feasible(trial))
    assert any(feasible) and not all(feasible)  # both branches were exercised
    assert sum(trial.user_attrs.get("source") == WARM_START for trial in done) == 1


def test_infeasible_and_unconstrained_trials_are_never_ranked():
    problem = build_problem(synthetic_profile(), TINY_FLOPS)
    budget = 0.3
    study = in_memory_run(problem, budget, 60)
    dense = problem.params(problem.uniform(0, 0))  # deviation 0, far over budget
    study.add_trial(optuna.trial.create_trial(params=dense, distributions=completed(study)[0].distributions, value=0.0))
    over = optuna.trial.create_trial(params=dense, distributions=completed(study)[0].distributions, value=-1.0,
                                     system_attrs={f"constraints:{CONSTRAINT}": 0.5})
    study.add_trial(over)
    lying = optuna.trial.create_trial(params=dense, distributions=completed(study)[0].distributions, value=-2.0,
                                      system_attrs={f"constraints:{CONSTRAINT}": -0.1})  # says feasible, is not
    study.add_trial(lying)
    ranked = ranked_candidates(study, problem.within(budget))
    assert ranked and all(problem.flops_fraction(candidate) <= budget for candidate, _, _ in ranked)
    assert problem.uniform(0, 0) not in {candidate for candidate, _, _ in ranked}
    assert [value for _, value, _ in ranked] == sorted(value for _, value, _ in ranked)


def test_resume_keeps_earlier_trials_and_tops_up_to_the_total(tmp_path):
    problem = build_problem(synthetic_profile(), TINY_FLOPS)
    path = tmp_path / "s.journal"

    def run(trials):
        study = open_study(path, "s", {"k": 1})
        worker, rank = join_study(study, {})
        ran = run_study(study, problem.within(0.3), trials, make_sampler("mutation", rank), worker,
                        warm_start=solve_knapsack(problem.within(0.3)).candidate, progress=False)
        return study, ran

    study, ran = run(70)
    first = [(t.number, t.params, t.value) for t in completed(study)]
    assert ran == 70 and len(first) == 70
    study, ran = run(130)
    again = [(t.number, t.params, t.value) for t in completed(study)]
    assert ran == 60 and len(again) == 130 and again[:70] == first
    assert sum(t.user_attrs.get("source") == WARM_START for t in completed(study)) == 1
    assert run(100)[1] == 0
    with pytest.raises(Spark3rError, match="another search problem"):
        open_study(path, "s", {"k": 2})


def test_same_seed_same_trials():
    problem = build_problem(synthetic_profile(), TINY_FLOPS, per_layer_query=True)
    params = [[t.params for t in completed(in_memory_run(problem, 0.3, 120, seed=seed, warm=False))]
              for seed in (3, 3, 4)]
    assert params[0] == params[1] and params[0] != params[2]


@pytest.mark.parametrize("per_layer_query", [False, True])
def test_sampled_trials_come_within_two_percent_of_the_knapsack_optimum(per_layer_query):
    problem = realistic_problem(per_layer_query)
    budget = 0.1
    optimum = solve_knapsack(problem.within(budget))
    assert optimum.exact
    study = in_memory_run(problem, budget, 1000)
    best = ranked_candidates(study, problem.within(budget), exclude_source=WARM_START)[0][1]
    assert optimum.deviation <= best <= 1.02 * optimum.deviation


# ------------------------------------------------------------------------------------------------------ CLI


def write_profile(root, name="vggt-tiny", **kwargs):
    """A synthetic profile saved where search-schedule finds it; vggt-tiny's has the model's 12 global layers."""
    kwargs.setdefault("layers", 12 if name == "vggt-tiny" else 6)
    return save_profile(synthetic_profile(model=name, **kwargs), root / "profiles" / name)


def test_cli_default_profile_exports_a_schedule_that_loads_and_applies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    older = write_profile(tmp_path, "vggt-1b", layers=24)
    os.utime(older, (time.time() - 100, time.time() - 100))
    write_profile(tmp_path)
    assert main(["--budget", "0.3", "--trials", "80", "--json"]) == 0
    captured = capsys.readouterr()
    assert "using the newest profile profiles/vggt-tiny/profile.json" in captured.err
    result = json.loads(captured.out)
    out = tmp_path / "schedules" / "vggt-tiny-b0.3.yaml"
    assert result["schedule"] == "schedules/vggt-tiny-b0.3.yaml"
    assert (tmp_path / "schedules/vggt-tiny-b0.3.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    schedule = load_schedule(out)
    model = build_model("vggt-tiny")
    check_model(schedule, model.adapter.model_name, model.adapter.num_global_layers)
    fraction = global_attention_fraction(model.flop_config(112, 112), 8, schedule)
    assert fraction <= 0.3 and fraction == pytest.approx(schedule.predicted["flops_fraction"], abs=1e-6)
    assert schedule.predicted["deviation"] == pytest.approx(result["knapsack"]["deviation"], rel=1e-6)
    assert schedule.budget.fraction == 0.3 and schedule.provenance["trials"] == 80
    profile_bytes = (tmp_path / "profiles/vggt-tiny/profile.json").read_bytes()
    assert schedule.provenance["profile_sha256"] == hashlib.sha256(profile_bytes).hexdigest()
    assert result["paper_rule"] is not None and result["trials"]["total"] == 80

    images = torch.rand(1, 3, 3, 112, 112)  # the schedule holds at any clip length
    with torch.no_grad():
        dense = model(images)["depth"]
        with apply_schedule(model, out):
            reduced_depth = model(images)["depth"]
        restored = model(images)["depth"]
    assert torch.isfinite(reduced_depth).all() and not torch.equal(reduced_depth, dense)
    assert torch.equal(restored, dense)

    assert main(["--budget", "0.3", "--trials", "120", "--json"]) == 0  # the same command resumes the study
    again = json.loads(capsys.readouterr().out)
    assert again["trials"]["total"] == 120 and again["trials"]["ran"] == 40


@pytest.mark.parametrize("argv, message", [
    (["--budget", "0"], "not a fraction of dense FLOPs"),
    (["--budget", "1.5"], "not a fraction of dense FLOPs"),
    (["--budget", "0.001"], "below the cheapest schedule"),
    (["--budget", "0.3", "--model", "vggt-1b"], "made for vggt-tiny, not vggt-1b"),
    (["--budget", "0.3", "--profile", "missing.json"], "does not exist"),
    (["--budget", "0.3", "--profile", "corrupt.json"], "not valid JSON"),
    (["--budget", "0.3", "--metric", "nope"], "no 'nope' tables"),
    (["--budget", "0.3", "--verify", "2"], "needs held-out clips"),
])
def test_cli_bad_input_is_one_sentence_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    write_profile(tmp_path)
    (tmp_path / "corrupt.json").write_text('{"spark3r_profile": 1, "mod')
    assert main(argv + ["--trials", "5"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0]


def test_cli_without_any_profile(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["--budget", "0.1"]) == 2
    assert "none found under profiles/" in capsys.readouterr().err


def cli(tmp_path, *argv):
    return subprocess.Popen([sys.executable, "-m", "spark3r.commands.search_schedule", "--profile",
                             "profiles/vggt-tiny", "--budget", "0.3", "--per-layer-query", *argv], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def journal_trials(tmp_path):
    study = optuna.load_study(study_name=None, storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(tmp_path / "schedules" / "vggt-tiny-b0.3.journal"))))
    return completed(study)


def stored_trials(tmp_path) -> list:
    """The journal's completed trials, or none while it has not been written."""
    try:
        return journal_trials(tmp_path)
    except (OSError, KeyError, ValueError, optuna.exceptions.OptunaError):
        return []


def test_workers_share_one_study_and_a_killed_worker_loses_nothing_written(tmp_path):
    write_profile(tmp_path)
    worker = cli(tmp_path, "--trials", "200")  # first, so the study it counts at its start is empty: it runs 200
    deadline = time.monotonic() + 120
    while not stored_trials(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.2)  # the doomed worker starts once this one runs trials (started together, it may finish 200
        # before this one counts the study, which then leaves this one nothing to run)
    doomed = cli(tmp_path, "--trials", "100000", "--seed", "1")
    output = worker.communicate(timeout=240)
    assert worker.returncode == 0, output
    deadline = time.monotonic() + 120
    while len({t.user_attrs["worker"] for t in journal_trials(tmp_path)}) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # until the doomed worker has written trials of its own
    doomed.send_signal(signal.SIGTERM)  # killed while still running trials
    _, err = doomed.communicate(timeout=60)
    assert doomed.returncode == 130 and "rerun the same command to resume" in err, (doomed.returncode, err[-3000:])
    before = [(t.number, t.params, t.value, t.user_attrs["worker"]) for t in journal_trials(tmp_path)]
    assert len(before) >= 200 and len({entry[3] for entry in before}) == 2  # both workers wrote to the study

    total = len(before) + 150
    rerun = cli(tmp_path, "--trials", str(total))  # the same command resumes the study
    output = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, output
    after = [(t.number, t.params, t.value, t.user_attrs["worker"]) for t in journal_trials(tmp_path)]
    assert len(after) == total and after[: len(before)] == before
    assert len({tuple(sorted(entry[1].items())) for entry in after}) > 0.9 * len(after)  # workers seldom repeat


def test_verify_measures_candidates_and_exports_the_best_measured(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_profile(tmp_path, weights="none", frames=3)
    assert main(["--budget", "0.3", "--trials", "40", "--verify", "2", "--calib", "synthetic:1:77", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    verified = result["verified"]
    assert result["uniform_best"] in verified  # always measured, beside the 2 best predicted
    assert len(verified) == 2 + (result["uniform_best"]["deviation"] > sorted(r["deviation"] for r in verified)[1])
    assert all(row["flops_fraction"] <= 0.3 for row in verified)
    assert all(np.isfinite(row["measured_deviation"]) and row["measured_deviation"] > 0 for row in verified)
    best = min(verified, key=lambda row: row["measured_deviation"])
    assert result["chosen"]["measured_deviation"] == best["measured_deviation"]
    assert result["chosen"]["kv_keep"] == best["kv_keep"]
    schedule = load_schedule(tmp_path / "schedules" / "vggt-tiny-b0.3.yaml")
    assert schedule.provenance["measured_deviation"] == pytest.approx(best["measured_deviation"], rel=1e-6)


def test_verify_uses_the_profiled_weights_file_and_refuses_a_changed_one(tmp_path, monkeypatch, capsys):
    from spark3r.models.loading import find_weights
    from spark3r.models.registry import get_entry
    from spark3r.models.loading import weights_identity

    monkeypatch.chdir(tmp_path)
    weights = tmp_path / "tiny.safetensors"
    weights.write_bytes(find_weights(get_entry("vggt-tiny")).read_bytes())
    write_profile(tmp_path, weights=weights_identity(str(weights), None), frames=3)
    argv = ["--budget", "0.3", "--trials", "20", "--verify", "1", "--calib", "synthetic:1:77", "--json",
            "--device", "cpu"]
    assert main(argv) == 0
    assert np.isfinite(json.loads(capsys.readouterr().out)["chosen"]["measured_deviation"])
    os.utime(weights, (time.time() + 5, time.time() + 5))  # the file replaced since profiling
    assert main([*argv, "--out", "other.yaml"]) == 2
    assert "which is gone or has changed since: pass --weights" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ boundaries


def hand_problem(layer_costs, layer_deviations, dense_flops):
    """A SearchProblem typed in by hand: one merge level, per layer the FLOPs and deviation of each K/V level."""
    costs, deviations = np.asarray(layer_costs, dtype=float), np.asarray(layer_deviations, dtype=float)
    layers, levels = costs.shape
    return SearchProblem(model="hand", frames=8, budget_of="global_attention", metric="score",
                         kv_keep=tuple(1.0 / 2**j for j in range(levels)), query_merge=(1,), per_layer_query=False,
                         kv_deviation=deviations, query_deviation=np.zeros((layers, 1)),
                         layer_flops=costs[:, :, None], fixed_flops=0.0, dense_flops=float(dense_flops),
                         options=ProfileOptions(kv_keep=tuple(1.0 / 2**j for j in range(levels)), query_merge=(1,)))


@pytest.mark.parametrize("budget, deviation", [(1.0, 0.0), (0.5, 1.0), (0.25, 3.0)])
def test_knapsack_takes_an_option_that_costs_exactly_the_budget(budget, deviation):
    # one layer, options costing 1, 1/2, 1/4 of dense with deviations 0, 1, 3: at a budget equal to an option's cost
    # that option is the optimum (it is within "at most the budget")
    problem = hand_problem([[4.0, 2.0, 1.0]], [[0.0, 1.0, 3.0]], dense_flops=4.0)
    result = solve_knapsack(problem.within(budget))
    assert result.deviation == deviation and result.flops_fraction == budget and result.exact


def test_knapsack_at_budgets_equal_to_schedule_costs_matches_brute_force():
    # layer 1's last option is free, so at the budget of (0, 2) one option of layer 0 takes the whole capacity
    problem = hand_problem([[8.0, 4.0, 2.0], [2.0, 1.0, 0.0]], [[0.0, 1.0, 2.5], [0.0, 0.1, 0.3]], dense_flops=8.0)
    assert solve_knapsack(problem.within(1.0)).deviation == 0.3  # (0, 2); (0, 1) costs 9, the next best (1, 0) 1.0
    for kv in itertools.product(range(3), repeat=2):
        budget = problem.flops_fraction(Candidate(kv, (0, 0)))
        if budget > 1:
            continue
        result = solve_knapsack(problem.within(budget))
        assert result.flops_fraction <= budget
        assert result.deviation == pytest.approx(brute_force(problem, budget), abs=1e-15)


def test_a_trial_exactly_at_the_budget_is_feasible_and_ranked():
    problem = build_problem(synthetic_profile(), TINY_FLOPS)
    candidate = problem.uniform(2, 1)
    problem = problem.within(problem.flops_fraction(candidate))  # the constraint is fraction - budget = 0.0 exactly
    study = optuna.create_study(direction="minimize")
    run_study(study, problem, 1, make_sampler("mutation", 0), "w0", warm_start=candidate, progress=False)
    trial = completed(study)[0]
    assert trial.constraints[CONSTRAINT] == 0.0
    assert is_feasible(trial)
    assert [ranked for ranked, _, _ in ranked_candidates(study, problem)] == [candidate]


# ------------------------------------------------------------------------------------------------------ --verify


def relative_depth_l1(model, images, schedule):
    """sum |D_reduced - D_dense| / sum |D_dense| in float64, the schedule applied by hand."""
    with torch.no_grad():
        dense = model(images)["depth"].double()
        with apply_schedule(model, schedule):
            moved = model(images)["depth"].double()
    return float((moved - dense).abs().sum() / dense.abs().sum()), float((moved - dense).abs().sum()
                                                                        / moved.abs().sum())


def test_verify_measures_the_reduced_run_against_the_dense_one():
    from spark3r.models.loading import load_model
    from spark3r.search.verify import held_out_clips, measure

    profile = synthetic_profile(layers=12, weights="auto", frames=3)
    clips = held_out_clips(profile, "synthetic:1:77")
    schedule = load_schedule({"spark3r_schedule": 1, "model": "vggt-tiny", "global_layers": 12,
                              "default": {"kv": {"keep": 0.25}, "query": {"merge": 2}}})
    measured = measure(profile, [schedule], clips, device=torch.device("cpu"), dtype=torch.float32, weights="auto",
                       seed=0, metric="depth", progress=False)
    expected, swapped = relative_depth_l1(load_model("vggt-tiny"), clips[0].images[None], schedule)
    assert abs(expected - swapped) > 1e-3 * expected  # the two directions are told apart
    assert measured.shape == (1, 1) and measured[0, 0] == pytest.approx(expected, rel=1e-5)


def test_verify_exports_the_best_measured_candidate_with_its_measurement(tmp_path, monkeypatch, capsys):
    from spark3r.data.clips import open_clips
    from spark3r.models.loading import load_model
    from spark3r.models.registry import get_entry

    monkeypatch.chdir(tmp_path)
    write_profile(tmp_path, weights="auto", frames=3, seed=2)  # a profile whose predicted best is not the measured one
    assert main(["--budget", "0.3", "--trials", "60", "--verify", "3", "--calib", "synthetic:1:77", "--metric",
                 "depth", "--json", "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    verified, chosen = result["verified"], result["chosen"]
    assert len(verified) in (3, 4) and result["uniform_best"] in verified
    best = min(verified, key=lambda row: row["measured_deviation"])
    assert chosen == best
    assert chosen["deviation"] > min(row["deviation"] for row in verified)  # here measuring changes the choice

    path = tmp_path / "schedules" / "vggt-tiny-b0.3.yaml"
    schedule = load_schedule(path)
    reductions = schedule.reductions(3)
    assert [r.kv_keep for r in reductions] == chosen["kv_keep"]
    assert [r.query_merge for r in reductions] == chosen["query_merge"]
    assert schedule.predicted["deviation"] == pytest.approx(chosen["deviation"], abs=1e-8)
    assert schedule.provenance["verify_clips"] == "synthetic:1:77" and schedule.provenance["verified_candidates"] == 3
    assert "--verify 3 --calib synthetic:1:77" in path.read_text()
    entry = get_entry("vggt-tiny")
    clip = open_clips("synthetic:1:77", preprocess=f"{entry.preprocess}:{entry.image_width}", frames=3)[0]
    measured, _ = relative_depth_l1(load_model("vggt-tiny"), clip.images[None], schedule)
    assert schedule.provenance["measured_deviation"] == pytest.approx(measured, rel=1e-5)


def uniform_measures_best(monkeypatch, frames):
    """spark3r.search.verify.measure replaced: 1.0 for every schedule, 0.5 for one that reduces all layers alike."""
    import spark3r.search.verify

    def measure(profile, schedules, clips, **_):
        alike = [len({(r.kv_keep, r.query_merge) for r in s.reductions(frames)}) == 1 for s in schedules]
        return np.where(alike, 0.5, 1.0)[:, None].repeat(len(clips), axis=1)
    monkeypatch.setattr(spark3r.search.verify, "measure", measure)


def test_verify_exports_the_uniform_schedule_when_it_measures_best(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_profile(tmp_path, weights="none", frames=3)
    uniform_measures_best(monkeypatch, frames=3)
    assert main(["--budget", "0.3", "--trials", "40", "--verify", "2", "--calib", "synthetic:1:77", "--json",
                 "--device", "cpu"]) == 0
    result = json.loads(capsys.readouterr().out)
    uniform = result["uniform_best"]
    assert uniform["measured_deviation"] == 0.5 and result["chosen"] == uniform
    assert result["chosen"]["deviation"] > min(row["deviation"] for row in result["verified"])  # not predicted best


def test_a_profile_rewritten_from_its_cache_resumes_the_study(tmp_path, monkeypatch, capsys):
    from spark3r.profiler.format import load_profile

    monkeypatch.chdir(tmp_path)
    path = write_profile(tmp_path)
    assert main(["--budget", "0.3", "--trials", "60", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trials"]["ran"] == 60
    profile = load_profile(path)  # profile-layers rerun on cached clips: same tables, new timings and time stamp
    profile.timings, profile.created = {"wall": 93.0}, "2026-12-01T22:00:00+00:00"
    save_profile(profile, path.parent)
    assert main(["--budget", "0.3", "--trials", "80", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["trials"]["total"] == 80 and again["trials"]["ran"] == 20


def test_the_summary_marks_rows_over_the_budget(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_profile(tmp_path)
    assert main(["--budget", "0.3", "--trials", "20"]) == 0
    rows = {line[:34].strip(): line for line in capsys.readouterr().out.splitlines()}
    paper = next(name for name in rows if name.startswith("paper's rule"))
    fraction = float(rows[paper][34:].split()[1])  # the vggt-tiny rule at 8 frames keeps 1/3 of K/V on 4 of 6 layers
    assert fraction > 0.3 and paper.endswith("(over budget)")
    assert not any(name.endswith("(over budget)") for name in rows if name.startswith(("knapsack", "chosen")))


def test_an_interrupt_waits_for_the_end_of_a_deferred_block():
    from spark3r.search.study import signals_deferred

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with signals_deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert seen == []  # held while the study is written
        time.sleep(0.05)
        assert seen == [signal.SIGTERM]  # delivered once the block ends
    finally:
        signal.signal(signal.SIGTERM, previous)
