"""The Optuna study over per-layer levels: storage, samplers, the constrained objective, resumable runs.

Every trial sets its FLOP constraint (`flops` = fraction - budget, feasible when <= 0) before it returns, so no trial
is ever taken as feasible by default. The shared study lives in a journal file, which several worker processes on one
machine can share, or in a database URL (e.g. postgresql://...) across machines. `trials` is the total the study should
hold: a rerun of the same command runs only the missing ones.

A worker runs its trials in an in-memory study and writes them to the shared one every `flush_every` trials (one
journal write per trial instead of one per parameter), reading the other workers' trials back at the same time. A
killed worker loses at most its unwritten trials, which the rerun makes up.
"""
from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import signal
import socket
import threading
import uuid
import warnings
from pathlib import Path
from typing import Callable, Iterator

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.exc import SQLAlchemyError
from tqdm import tqdm

from spark3r.errors import ParameterError
from spark3r.search.mutation import MutationSampler
from spark3r.search.problem import Candidate, SearchProblem

SAMPLERS = ("mutation", "tpe", "nsga2", "gp")
CONSTRAINT = "flops"
WARM_START = "knapsack"
FLUSH_EVERY = 50


def make_sampler(sampler: str, seed: int) -> optuna.samplers.BaseSampler:
    """mutation: evolution around the best feasible trials (fast: thousands of trials in seconds); tpe: multivariate
    TPE (cost grows with the square of the trial count); nsga2: NSGA-II with constrained domination; gp: Gaussian
    process BO (cost grows with the cube of the trial count: a few hundred trials at most)."""
    if sampler == "mutation":
        return MutationSampler(seed=seed)
    if sampler == "tpe":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=20)
    if sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    raise ParameterError(f"`sampler` {sampler!r} is unknown: use one of {', '.join(SAMPLERS)}", "sampler")


def open_storage(storage: str | Path) -> optuna.storages.BaseStorage | str:
    """A database URL (anything with '://') as is, else a journal file at that path."""
    storage = str(storage)
    if "://" in storage:
        return storage
    path = Path(storage).resolve()  # absolute: Optuna's lock is a symlink to this path, read from its own folder
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def problem_key(problem: SearchProblem, profile_sha256: str) -> dict:
    """What defines the search problem: trials of different problems never share a study."""
    return {"profile_sha256": profile_sha256, "budget": problem.budget, "budget_of": problem.budget_of,
            "frames": problem.frames, "metric": problem.metric, "per_layer_query": problem.per_layer_query,
            "kv_keep": list(problem.kv_keep), "query_merge": list(problem.query_merge)}


def default_study_name(problem: SearchProblem, profile_sha256: str, sampler: str) -> str:
    """`<model>-b<budget>-<sampler>-<digest of the problem>`."""
    digest = hashlib.sha256(json.dumps(problem_key(problem, profile_sha256), sort_keys=True).encode())
    return f"{problem.model}-b{problem.budget:g}-{sampler}-{digest.hexdigest()[:10]}"


def open_study(storage: str | Path, name: str, key: dict) -> optuna.Study:
    """Create or load the shared study `name` (workers sample in their own in-memory copy, see `run_study`); a study
    of that name made for another problem (`key`) is refused."""
    try:
        study = optuna.create_study(storage=open_storage(storage), study_name=name, direction="minimize",
                                    load_if_exists=True)
    except (ValueError, ImportError, RuntimeError, OSError, SQLAlchemyError) as error:
        reason = str(error).splitlines()[0]
        raise ParameterError(f"cannot open the study storage {storage} ({reason}): pass a journal file path in a "
                             "writable folder or a database URL (e.g. postgresql://...) to `storage`", "storage") \
            from None
    stored = study.user_attrs.get("problem")
    if stored is None:
        study.set_user_attr("problem", key)
    elif stored != json.loads(json.dumps(key)):
        raise ParameterError(f"study {name!r} in {storage} was made for another search problem: pass a new `study` "
                             "name or `storage` file", "study", "storage")
    return study


def make_objective(problem: SearchProblem) -> Callable[[optuna.Trial], float]:
    """The predicted deviation of the trial's levels, with the FLOP constraint set first."""

    def objective(trial: optuna.Trial) -> float:
        params = {f"kv_keep.{layer}": trial.suggest_categorical(f"kv_keep.{layer}", problem.kv_keep)
                  for layer in range(problem.global_layers)}
        query_names = ([f"query_merge.{layer}" for layer in range(problem.global_layers)] if problem.per_layer_query
                       else ["query_merge"])
        params.update({name: trial.suggest_categorical(name, problem.query_merge) for name in query_names})
        candidate = problem.candidate(params)
        trial.set_constraint(CONSTRAINT, problem.flops_fraction(candidate) - problem.budget)
        return problem.deviation(candidate)

    return objective


def completed(study: optuna.Study) -> list[FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def is_feasible(trial: FrozenTrial) -> bool:
    """A completed trial whose constraint was set and met (a trial without one is never feasible here)."""
    constraints = trial.constraints
    return CONSTRAINT in constraints and all(value <= 0 for value in constraints.values())


def join_study(study: optuna.Study, info: dict) -> tuple[str, int]:
    """Register a worker in the shared study; returns its id and rank (0 for the first worker ever to join)."""
    worker = uuid.uuid4().hex[:12]
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    study.set_user_attr(f"worker.{worker}", {"host": socket.gethostname(), "started": started, **info})
    workers = [name for name in study.user_attrs if name.startswith("worker.")]
    return worker, workers.index(f"worker.{worker}")


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block ends (main thread), so an interrupt never lands inside a write to the
    shared study: a signal that comes meanwhile is recorded and raised again, to its own handler, as the block exits."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda signum, frame: caught.append(signum))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if caught:
            signal.raise_signal(caught[0])


def run_study(study: optuna.Study, problem: SearchProblem, trials: int,
              sampler: optuna.samplers.BaseSampler, worker: str, warm_start: Candidate | None = None,
              flush_every: int = FLUSH_EVERY, progress: bool = True) -> int:
    """Run trials until the shared `study` holds `trials` completed ones (with other workers); returns how many ran
    here. `warm_start` is enqueued first unless the study already holds it."""
    done = completed(study)
    if len(done) >= trials:
        return 0
    local = optuna.create_study(direction="minimize", sampler=sampler)
    local.add_trials(done)
    synced = {trial.number for trial in done}
    if warm_start is not None and not any(trial.user_attrs.get("source") == WARM_START for trial in done):
        local.enqueue_trial(problem.params(warm_start), user_attrs={"source": WARM_START})
    objective = make_objective(problem)
    pending: list[FrozenTrial] = []
    ran = 0
    bar = tqdm(total=trials, initial=len(done), desc="search", unit="trial", disable=not progress, leave=False)

    def tagged_objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", worker)
        return objective(trial)

    def flush() -> int:
        """Write pending trials to the shared study, read the other workers' back; returns its completed count."""
        with signals_deferred():  # an interrupt waits for the writes: a half-written journal entry would lose trials
            while pending:
                study.add_trial(pending.pop(0))
        shared = completed(study)
        local.add_trials([trial for trial in shared
                          if trial.number not in synced and trial.user_attrs.get("worker") != worker])
        synced.update(trial.number for trial in shared)
        return len(shared)

    def after_trial(local_study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal ran
        ran += 1
        bar.update(1)
        pending.append(trial)
        if len(pending) >= flush_every and flush() >= trials:
            local_study.stop()

    try:
        local.optimize(tagged_objective, n_trials=trials - len(done), callbacks=[after_trial], gc_after_trial=False)
    finally:
        flush()
        bar.close()
    return ran


def ranked_candidates(study: optuna.Study, problem: SearchProblem,
                      exclude_source: str | None = None) -> list[tuple[Candidate, float, FrozenTrial]]:
    """Distinct feasible candidates of the study, least predicted deviation first (ties: lowest trial number).

    Feasibility is the trial's stored constraint and, independently, the candidate's FLOPs fraction recomputed here.
    """
    ranked, seen = [], set()
    for trial in sorted(completed(study), key=lambda t: (t.value, t.number)):
        if not is_feasible(trial) or (exclude_source and trial.user_attrs.get("source") == exclude_source):
            continue
        candidate = problem.candidate(trial.params)
        if candidate in seen or not problem.feasible(candidate):
            continue
        seen.add(candidate)
        ranked.append((candidate, float(trial.value), trial))
    return ranked
