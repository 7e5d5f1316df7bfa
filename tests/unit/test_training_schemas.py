"""The training service's pure parts: request and option schemas, their mapping to TrainConfig, the publish
decision, the throttled stop check, record -> reply, the client's event parser and the CLI's option flags."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import ValidationError

from prefixserve.adapters.errors import NotFoundError, PrefixServeError
from prefixserve.adapters.store import EpochRecord, JobError, JobRecord
from prefixserve.client.training import EventParser, TrainingJob, job_of_event
from prefixserve.server.training_runner import StopCheck, decide, reason_text
from prefixserve.server.training_schemas import (
    DECISIONS,
    BaselineScores,
    EvalScores,
    JobCreate,
    JobOut,
    TrainingOptions,
    TrainingSettings,
)
from prefixserve.trainer.config import TrainConfig

INLINE = {"format": "tsv", "content": "id\tdocument\tlabel\n1\tgood\t1\n"}


def test_job_request_needs_exactly_one_dataset_and_forbids_unknown_fields():
    assert JobCreate(prefix_id="s", dataset_id="ds_1").dataset is None
    assert JobCreate.model_validate({"prefix_id": "s", "dataset": INLINE}).dataset.format == "tsv"
    bad: list[dict[str, Any]] = [
        {"prefix_id": "s"},  # no dataset
        {"prefix_id": "s", "dataset_id": "ds_1", "dataset": INLINE},  # both
        {"prefix_id": "s", "dataset_id": "ds_1", "learning_rate": 0.1},  # unknown option
        {"prefix_id": "s", "dataset": {**INLINE, "format": "xlsx"}},
        {"prefix_id": "s", "dataset": {**INLINE, "content": ""}},
        {"prefix_id": "s", "dataset_id": "ds_1", "epochs": 51},  # caps
        {"prefix_id": "s", "dataset_id": "ds_1", "batch_size": 0},
        {"prefix_id": "s", "dataset_id": "ds_1", "eval_split": 0.0},  # the decision needs eval rows
        {"prefix_id": "s", "dataset_id": "ds_1", "kind": "adapterfusion"},
        {"prefix_id": "s", "dataset_id": "ds_1", "kind": "lora", "num_virtual_tokens": 4},  # another kind's option
        {"prefix_id": "s", "dataset_id": "ds_1", "kind": "prefix", "lora_r": 4},
        {"prefix_id": "s", "dataset_id": "ds_1", "label_names": ["only"]},
    ]
    for body in bad:
        with pytest.raises(ValidationError):
            JobCreate.model_validate(body)
    options = JobCreate(prefix_id="s", dataset_id="ds_1", kind="lora", lora_r=4, epochs=2).options()
    assert isinstance(options, TrainingOptions) and (options.kind, options.lora_r, options.epochs) == ("lora", 4, 2)
    assert "prefix_id" not in options.model_dump() and "dataset" not in options.model_dump()


def test_option_defaults_are_the_trainers_and_map_onto_train_config():
    cli = TrainConfig(backbone="b", train="t")  # the command line's defaults
    given = TrainingOptions()
    for name in ("kind", "epochs", "head_lr", "batch_size", "max_length", "eval_split", "seed", "patience"):
        assert getattr(given, name) == getattr(cli, name), name
    cfg = given.train_config(backbone="bb", train="/data/x.csv", fmt="csv", device="cuda")
    assert (cfg.backbone, cfg.train, cfg.format, cfg.device, cfg.eval) == ("bb", "/data/x.csv", "csv", "cuda", None)
    assert cfg.lr is None and cfg.num_virtual_tokens is None and cfg.lora_r == cli.lora_r  # unset: the trainer's
    assert not cfg.progress and cfg.out is None and not cfg.train_backbone

    options = TrainingOptions(
        kind="prompt", num_virtual_tokens=7, lr=0.2, epochs=4, eval_split=0.3, seed=9, label_names=["n", "p"]
    )
    cfg = options.train_config(backbone="bb", train="t", fmt="jsonl")
    assert (cfg.kind, cfg.num_virtual_tokens, cfg.lr, cfg.epochs, cfg.eval_split, cfg.seed) == (
        "prompt", 7, 0.2, 4, 0.3, 9,
    )  # fmt: skip
    assert cfg.label_names == ["n", "p"] and cfg.label_names is not options.label_names
    assert TrainingOptions(kind="lora", lora_r=16).train_config(backbone="b", train="t", fmt="tsv").lora_r == 16


def test_settings_defaults_and_limits():
    s = TrainingSettings()
    assert s.enabled and s.num_gpus is None and s.limits.max_active_jobs >= 1
    s = TrainingSettings.model_validate({"limits": {"max_active_jobs": 2, "max_job_s": 60}})
    assert (s.limits.max_active_jobs, s.limits.max_job_s) == (2, 60)
    for bad in ({"limits": {"max_active_jobs": -1}}, {"num_cpus": -1}, {"bogus": 1}):
        with pytest.raises(ValidationError):
            TrainingSettings.model_validate(bad)


def scores(acc: float, f1: float, version: int | None = None) -> Any:
    if version is None:
        return EvalScores(accuracy=acc, macro_f1=f1, rows=10)
    return BaselineScores(accuracy=acc, macro_f1=f1, rows=10, version=version, kind="prefix")


@pytest.mark.parametrize(
    "new, baseline, force, problem, decision",
    [
        ((0.5, 0.5), None, False, None, "first_version"),
        ((0.5, 0.5), None, True, None, "first_version"),  # force never hides the natural reason
        ((0.8, 0.7), (0.7, 0.9), False, None, "better"),  # accuracy first
        ((0.7, 0.8), (0.7, 0.7), False, None, "better"),  # then macro-F1
        ((0.7, 0.7), (0.7, 0.7), False, None, "not_better"),  # a tie keeps the served version
        ((0.6, 0.9), (0.7, 0.1), False, None, "not_better"),
        ((0.6, 0.9), (0.7, 0.1), True, None, "forced"),
        ((0.9, 0.9), None, False, "labels_differ", "labels_differ"),
        ((0.9, 0.9), None, True, "labels_differ", "forced"),
        ((0.9, 0.9), None, False, "baseline_unusable", "baseline_unusable"),
    ],
)
def test_publish_decision(new, baseline, force, problem, decision):
    base = scores(baseline[0], baseline[1], version=3) if baseline else None
    got = decide(scores(*new), base, force=force, problem=problem)
    assert got == decision
    assert DECISIONS[got] == (decision in ("first_version", "better", "forced"))
    text = reason_text(got, scores(*new), base)
    assert f"{new[0]:.4f}" in text or got in ("labels_differ", "baseline_unusable")
    assert ("version 3" in text) == (base is not None)


class FakeJobs:
    """get_job only: counts reads; ``record`` is what the store holds now (None: deleted)."""

    def __init__(self, record: JobRecord | None):
        self.record, self.reads = record, 0

    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        self.reads += 1
        if self.record is None:
            raise NotFoundError("gone")
        return self.record


def record(**kw: Any) -> JobRecord:
    values: dict[str, Any] = dict(
        tenant="acme", job_id="job_" + "0" * 24, state="running", prefix_id="s", dataset_id="ds_" + "0" * 24
    )
    values.update(options=TrainingOptions().model_dump(), created=100.0, updated=100.0)
    values.update(kw)
    return JobRecord(**values)


def test_stop_check_throttles_reads_and_stops_for_cancel_timeout_and_deletion():
    now = [1000.0]
    jobs = FakeJobs(record())
    stop = StopCheck(jobs, "acme", "job_x", started=1000.0, max_job_s=60.0, poll_s=1.0, clock=lambda: now[0])  # type: ignore[arg-type]
    for _ in range(50):  # many steps within one second: one read
        assert stop() is None
        now[0] += 0.01
    assert jobs.reads == 1
    now[0] += 1.0
    assert stop() is None and jobs.reads == 2
    jobs.record = record(cancel_requested=True)
    assert stop() is None  # not read again yet
    now[0] += 1.0
    assert stop() == "cancelled" and stop() == "cancelled"

    stop = StopCheck(FakeJobs(record()), "acme", "j", started=1000.0, max_job_s=60.0, clock=lambda: now[0])  # type: ignore[arg-type]
    now[0] = 1061.0
    assert stop() == "timeout"
    assert StopCheck(FakeJobs(record()), "acme", "j", 0.0, 0.0, clock=lambda: 1e9)() is None  # type: ignore[arg-type]  # 0: no limit
    assert StopCheck(FakeJobs(None), "acme", "j", 0.0, 0.0)() == "gone"  # type: ignore[arg-type]
    seen = StopCheck(FakeJobs(record()), "acme", "j", 0.0, 0.0)  # type: ignore[arg-type]
    seen.seen(record(state="cancelled"))  # a progress write that found the job cancelled
    assert seen.reason == "cancelled"


def test_record_as_reply_hides_tenant_and_runner():
    rec = record(
        state="failed",
        history=(EpochRecord(1, 0.7, 1.5, 0.6, 0.75, 0.7),),
        epoch=1,
        epochs=3,
        runner="train-job_x",
        error=JobError("job_timeout", "too long"),
    )
    out = JobOut.of(rec)
    body = out.model_dump(mode="json")
    assert "tenant" not in body and "runner" not in body
    assert body["error"] == {"code": "job_timeout", "message": "too long"} and body["result"] is None
    assert body["history"][0] == dataclasses.asdict(rec.history[0])
    assert out.options == TrainingOptions()
    job = TrainingJob.from_json(body)  # the client reads it back
    assert job.done and job.history[0].eval_accuracy == 0.75 and job.published_version is None


def test_event_parser_and_error_events():
    parser = EventParser()
    lines = [": keep-alive", "", "event: job", 'data: {"a":', "data: 1}", "", "event: other", "data: {}", ""]
    events = [e for line in lines if (e := parser.feed(line + "\n"))]
    assert events == [("job", '{"a":\n1}'), ("other", "{}")]
    assert job_of_event("other", "{}") is None
    with pytest.raises(NotFoundError):
        job_of_event("error", '{"error": {"code": "not_found", "message": "gone"}}')
    with pytest.raises(PrefixServeError) as err:
        job_of_event("job", "not json")
    assert err.value.code == "bad_response"


def test_cli_sends_only_the_options_given():
    from prefixserve.server.main import build_parser

    args = build_parser().parse_args(
        ["job", "submit", "train.tsv", "--prefix-id", "s", "--kind", "lora", "--lora-r", "4", "--label-names", "n,p"]
    )
    given = {n: getattr(args, n) for n in TrainingOptions.model_fields if getattr(args, n) is not None}
    assert given == {"kind": "lora", "lora_r": 4, "label_names": ["n", "p"]}
    assert TrainingOptions(**given).lora_r == 4
    with pytest.raises(SystemExit):
        build_parser().parse_args(["job", "submit", "train.tsv", "--prefix-id", "s", "--kind", "nope"])


def test_training_bodies_get_their_own_cap():
    from prefixserve.server import state
    from prefixserve.server.middleware import body_cap
    from prefixserve.server.schemas import AppSettings

    settings = AppSettings.without_env(max_request_bytes=1000, training={"max_upload_bytes": 5000})
    old, state.settings = state.settings, settings
    try:
        assert body_cap("POST", "/v1/datasets") == body_cap("POST", "/v1/training-jobs") == 5000
        assert body_cap("POST", "/v1/classify") == body_cap("GET", "/v1/datasets") == 1000
    finally:
        state.settings = old


def test_documented_examples_validate():
    extra: Any = JobCreate.model_config["json_schema_extra"]
    examples = extra["examples"]
    assert len(examples) == 2
    for example in examples:
        JobCreate.model_validate(example)
