"""A training job's runner: one Ray actor per job, beside the Serve app on the same cluster, never in a replica.

The Ingress creates the record (``queued``) in the store, then :func:`launch` starts a detached actor named
:func:`runner_name` (job id) in :data:`NAMESPACE`, with the job's declared resources (``num_cpus``, a GPU
fraction when the cluster has GPUs) and ``max_restarts=0``, and calls its ``run``. :class:`JobRun` then:

1. marks the job ``running`` (a job cancelled while queued is left as it is);
2. loads the app's backbone (float32; ``cuda`` when the actor holds a GPU share, else the CPU) and checks
   its fingerprint equals the one the serving Worker reported (else ``backbone_mismatch``);
3. trains with :func:`prefixserve.trainer.train.train` on the stored dataset, writing epoch and history to
   the record after every epoch; :class:`StopCheck` (asked before every step, reading the store at most
   once per second) stops it when the tenant cancels or the job outlives ``max_job_s`` (``job_timeout``);
4. evaluates the new adapter and the tenant's served version of ``prefix_id`` on the job's eval rows with
   the serving :class:`~prefixserve.adapters.engine.Engine` (one code path, one float32 backbone, both
   adapters truncated as they would be served), and publishes with ``store.put`` (validated against the
   backbone's spec) as :func:`decide` says;
5. writes the terminal state with its :class:`~.training_schemas.JobResult` or :class:`JobError`, and exits.

Decisions:
* The actor outlives the Serve app (``lifetime="detached"``): deleting or redeploying the app does not stop a
  job, and the new Ingress reads its progress from the same store. The Ingress never waits for it; it only
  counts the final state for ``/metrics`` when ``run`` ends (reading it from the store).
* ``max_job_s`` counts from ``started`` (time spent queued for resources is not the job's).
* A cancel that arrives after training but before publishing stops the publish; one that arrives during
  ``put`` cannot (the record then says ``cancelled`` although the version exists: the versions list shows it).
* Errors become ``JobError(code, message)`` with the human message of our own errors; anything unexpected is
  ``internal`` with an incident id, and its traceback goes to the actor's log only.
* No torch at import: the Ingress imports this module to launch runners.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from prefixserve.adapters.errors import FingerprintMismatchError, NotFoundError, PrefixServeError, as_error
from prefixserve.adapters.store import EpochRecord, JobError, JobRecord, Store, TrainingStore

from .training_data import dataset_file
from .training_schemas import DECISIONS, BaselineScores, Decision, EvalScores, JobResult, TrainingOptions

if TYPE_CHECKING:
    from prefixserve.adapters.backbone import Backbone
    from prefixserve.adapters.engine import Engine
    from prefixserve.trainer.data import Example

log = logging.getLogger("prefixserve.training")
NAMESPACE = "prefixserve-training"  # the runners' Ray namespace (named, detached actors)
POLL_S = 1.0  # the stop check reads the job record at most this often
EVAL_BATCH = 64


def runner_name(job_id: str) -> str:
    return f"train-{job_id}"


@dataclass(frozen=True)
class RunnerSpec:
    """Everything a runner needs, sent once when the actor is created (no settings object, no handles)."""

    store: str  # the store URL
    tenant: str
    job_id: str
    backbone: str  # the app's backbone setting (hub id or folder)
    fingerprint: str  # what the serving Worker loaded: the runner must load the same
    device: str  # cpu | cuda
    torch_threads: int
    max_job_s: float  # 0: no limit


# ---- on the Ray cluster -------------------------------------------------------------------------------
class TrainingRunner:
    """The actor: ``run`` does the job, then the actor exits (its caller sees the exit, not a value)."""

    def __init__(self, spec: RunnerSpec):
        self.spec = spec

    def run(self) -> None:
        import ray

        try:
            run_job(self.spec)
        finally:
            ray.actor.exit_actor()


def launch(spec: RunnerSpec, *, num_cpus: float, num_gpus: float) -> Any:
    """Start the job's detached actor and its ``run``; returns ``run``'s ObjectRef (it fails when the actor exits)."""
    import ray

    actor: Any = (
        ray.remote(TrainingRunner)
        .options(
            name=runner_name(spec.job_id),
            namespace=NAMESPACE,
            lifetime="detached",
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=0,
            max_task_retries=0,
        )
        .remote(spec)
    )
    return actor.run.remote()


def runner_alive(name: str) -> bool:
    """Whether the named runner actor exists (pending, starting or running)."""
    import ray

    try:
        ray.get_actor(name, namespace=NAMESPACE)
        return True
    except ValueError:  # no such actor: never created, or dead (a dead actor's name is released)
        return False


def thread_count(num_cpus: float, torch_threads: int | None) -> int:
    return torch_threads or max(1, math.ceil(num_cpus))


def run_job(spec: RunnerSpec) -> str:
    """Open the store and run the job; the final state."""
    from prefixserve.adapters.store import open_store

    store = open_store(spec.store)
    try:
        return JobRun(spec, store).run()
    finally:
        store.close()


# ---- the job ------------------------------------------------------------------------------------------
class StopCheck:
    """``TrainHooks.should_stop``: "timeout" past ``max_job_s`` (checked every call), "cancelled" once the record
    asks for it or is no longer active, "gone" when it was deleted (read at most every ``poll_s``)."""

    def __init__(
        self,
        store: TrainingStore,
        tenant: str,
        job_id: str,
        started: float,
        max_job_s: float,
        *,
        poll_s: float = POLL_S,
        clock: Callable[[], float] = time.time,
    ):
        self.store, self.tenant, self.job_id = store, tenant, job_id
        self.started, self.max_job_s, self.poll_s, self.clock = started, max_job_s, poll_s, clock
        self.reason: str | None = None
        self._read_at = -math.inf

    def __call__(self) -> str | None:
        if self.reason is None:
            now = self.clock()
            if self.max_job_s and now - self.started > self.max_job_s:
                self.reason = "timeout"
            elif now - self._read_at >= self.poll_s:
                self._read_at = now
                try:
                    self.seen(self.store.get_job(self.tenant, self.job_id))
                except NotFoundError:
                    self.reason = "gone"
        return self.reason

    def seen(self, record: JobRecord) -> None:
        """A fresh copy of the record (read here, or returned by a progress write)."""
        if self.reason is None and (record.cancel_requested or record.state != "running"):
            self.reason = "cancelled"


def decide(
    new: EvalScores, baseline: BaselineScores | None, *, force: bool, problem: Decision | None = None
) -> Decision:
    """Publish or keep the served version (see :data:`~.training_schemas.DECISIONS`).

    ``problem``: the baseline could not be compared (``labels_differ``, ``baseline_unusable``). Better means a
    higher accuracy, or the same accuracy and a higher macro-F1; an exact tie keeps the served version.
    ``force`` publishes what would not be, and says so (``forced``); it never hides a natural reason.
    """
    if problem is not None:
        natural: Decision = problem
    elif baseline is None:
        natural = "first_version"
    elif (new.accuracy, new.macro_f1) > (baseline.accuracy, baseline.macro_f1):
        natural = "better"
    else:
        natural = "not_better"
    return "forced" if force and not DECISIONS[natural] else natural


def reason_text(decision: Decision, new: EvalScores, baseline: BaselineScores | None) -> str:
    """One human sentence for the record."""
    scores = f"accuracy {new.accuracy:.4f}, macro-F1 {new.macro_f1:.4f} on {new.rows} eval rows"
    against = (
        f" against version {baseline.version}'s accuracy {baseline.accuracy:.4f}, macro-F1 {baseline.macro_f1:.4f}"
        if baseline is not None
        else ""
    )
    return {
        "first_version": f"no version was served: published ({scores})",
        "better": f"beats the served version: {scores}{against}",
        "forced": f"published because the job set force: {scores}{against}",
        "not_better": f"does not beat the served version: {scores}{against}",
        "labels_differ": "the served version has other labels, so the two cannot be compared (set force to publish)",
        "baseline_unusable": "the served version could not be evaluated on this backbone (set force to publish)",
    }[decision]


def evaluate(engine: Engine, data: bytes, key: str, examples: list[Example], labels: list[str]) -> EvalScores:
    """Accuracy and macro-F1 of the packed adapter ``data`` on ``examples`` (label names), as the engine serves it."""
    from prefixserve.adapters.engine import Row
    from prefixserve.trainer.train import metrics

    adapter = engine.to_device(key, data)  # validated against the engine's backbone
    index = {name: i for i, name in enumerate(labels)}
    pred: list[int] = []
    gold: list[int] = []
    for start in range(0, len(examples), EVAL_BATCH):
        chunk = examples[start : start + EVAL_BATCH]
        for example, p in zip(chunk, engine.predict([Row(adapter, e.text, e.pair) for e in chunk])):
            pred.append(index.get(p.label, -1))
            gold.append(index[example.label])
    m = metrics(pred, gold, len(labels))
    return EvalScores(accuracy=m["accuracy"], macro_f1=m["macro_f1"], rows=len(gold))


class JobRun:
    """One job, start to end, against a store (``run_job`` opens it; tests pass their own)."""

    def __init__(self, spec: RunnerSpec, store: Store, *, poll_s: float = POLL_S):
        self.spec, self.store, self.poll_s = spec, store, poll_s
        self.tenant, self.job_id = spec.tenant, spec.job_id

    def update(self, **changes: Any) -> JobRecord:
        return self.store.update_job(self.tenant, self.job_id, **changes)

    def run(self) -> str:
        try:
            record = self.store.get_job(self.tenant, self.job_id)
        except NotFoundError:
            return "gone"  # the tenant (and its jobs) was deleted meanwhile
        if not record.active:
            return record.state  # cancelled while queued
        if record.cancel_requested:
            return self.update(state="cancelled").state
        record = self.update(state="running", started=time.time())
        if record.state != "running":
            return record.state
        assert record.started is not None
        stop = StopCheck(self.store, self.tenant, self.job_id, record.started, self.spec.max_job_s, poll_s=self.poll_s)
        try:
            try:
                result = self.train_and_publish(record, stop)
                return self.update(state="succeeded", result=result.model_dump()).state
            except Exception as exc:
                return self.update(**self.failure(exc)).state
        except NotFoundError:  # the record itself is gone: its tenant was deleted during the job
            return "gone"

    def failure(self, exc: Exception) -> dict[str, Any]:
        """The record's terminal fields for ``exc``: cancelled, timed out, or failed with a human message."""
        from prefixserve.trainer.train import TrainingStopped

        if isinstance(exc, TrainingStopped) and exc.reason == "timeout":
            limit = f"{self.spec.max_job_s:g}"
            error = JobError("job_timeout", f"the job ran longer than this server allows ({limit} s) and was stopped")
            return {"state": "failed", "error": error}
        if isinstance(exc, TrainingStopped):  # cancelled (or gone: then the write raises NotFoundError)
            return {"state": "cancelled"}
        err = as_error(exc, log)
        return {"state": "failed", "error": JobError(err.code, err.message)}

    def train_and_publish(self, record: JobRecord, stop: StopCheck) -> JobResult:
        import torch

        from prefixserve.adapters.backbone import load_backbone
        from prefixserve.trainer.train import TrainHooks, TrainingStopped, train

        torch.set_num_threads(self.spec.torch_threads)
        options = TrainingOptions.model_validate(record.options)
        info, data = self.store.get_dataset(self.tenant, record.dataset_id)
        backbone = load_backbone(self.spec.backbone, device=self.spec.device)
        if backbone.fingerprint != self.spec.fingerprint:
            raise FingerprintMismatchError(
                f"the runner loaded backbone {self.spec.backbone!r} as {backbone.fingerprint}, but the server serves "
                f"{self.spec.fingerprint}; the job cannot train an adapter the server would accept"
            )
        history: list[EpochRecord] = []

        def on_epoch(rec: dict[str, Any]) -> None:
            history.append(epoch_record(rec))
            stop.seen(self.update(epoch=rec["epoch"], history=tuple(history)))

        with dataset_file(data, info.format, f"dataset {info.dataset_id}") as path:
            cfg = options.train_config(
                backbone=self.spec.backbone, train=str(path), fmt=info.format, device=self.spec.device
            )
            self.update(epochs=cfg.epochs)
            res = train(cfg, backbone=backbone, hooks=TrainHooks(on_epoch=on_epoch, should_stop=stop))
        assert res.packed is not None  # every job kind exports
        labels = res.labels
        new, baseline, problem = self.compare(backbone, res.packed, res.eval_examples, labels, record.prefix_id)
        decision = decide(new, baseline, force=options.force, problem=problem)
        version = None
        if DECISIONS[decision]:
            if stop():  # a cancel (or the time limit) that came in while evaluating: publish nothing
                raise TrainingStopped(stop.reason or "cancelled")
            version = self.publish(backbone, record.prefix_id, res.packed)
        log_ = res.log
        return JobResult(
            published=version is not None,
            version=version,
            decision=decision,
            reason=reason_text(decision, new, baseline),
            new=new,
            baseline=baseline,
            labels=labels,
            best_epoch=int(res.best["epoch"]),
            train_rows=int(log_["train_rows"]),
            eval_rows=int(log_["eval_rows"]),
            bad_rows={k: {r: int(n) for r, n in v.items()} for k, v in log_["bad_rows"].items()},
            trainable_params=int(log_["trainable_params_total"]),
            train_time_s=float(log_["train_time_s"]),
        )

    def compare(
        self, backbone: Backbone, packed: bytes, examples: list[Example], labels: list[str], prefix_id: str
    ) -> tuple[EvalScores, BaselineScores | None, Decision | None]:
        """The new adapter's scores, the served version's (None: there is none), and why they cannot be compared."""
        from prefixserve.adapters.engine import Engine

        engine = Engine(backbone)
        new = evaluate(engine, packed, f"job:{self.job_id}", examples, labels)
        try:
            head, current = self.store.get(self.tenant, prefix_id)  # the served version (the pin, else newest)
        except NotFoundError:
            return new, None, None
        if set(head.meta.get("labels", [])) != set(labels):
            return new, None, "labels_differ"
        try:
            scores = evaluate(engine, current, f"job:{self.job_id}:baseline", examples, labels)
        except PrefixServeError as exc:
            log.warning("job %s: served version %s not usable as a baseline: %s", self.job_id, head.version, exc)
            return new, None, "baseline_unusable"
        return new, BaselineScores(**scores.model_dump(), version=head.version, kind=head.meta.get("kind", "")), None

    def publish(self, backbone: Backbone, prefix_id: str, packed: bytes) -> int:
        """``store.put`` after validating the bytes against the backbone's spec (what the Ingress's uploads get)."""
        from prefixserve.adapters.format import inspect_packed

        inspect_packed(packed, expect=backbone.spec)
        return self.store.put(self.tenant, prefix_id, packed).version


def epoch_record(rec: dict[str, Any]) -> EpochRecord:
    """The trainer's per-epoch history dict as the store's record."""

    def optional(name: str) -> float | None:
        value = rec.get(name)
        return float(value) if value is not None else None

    return EpochRecord(
        epoch=int(rec["epoch"]),
        train_loss=float(rec["train_loss"]),
        epoch_time_s=float(rec["epoch_time_s"]),
        eval_loss=optional("eval_loss"),
        eval_accuracy=optional("eval_accuracy"),
        eval_macro_f1=optional("eval_macro_f1"),
    )
