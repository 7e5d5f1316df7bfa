"""AppSettings from PREFIXSERVE_* env: flag > env > default, resolved once (replicas get the built object)."""

from __future__ import annotations

import pickle

import pytest


def parse(*argv: str):
    from prefixserve.server.cli import settings_from_args
    from prefixserve.server.main import build_parser

    return settings_from_args(build_parser().parse_args(["serve", *argv]))


def test_flag_beats_env_beats_default(monkeypatch):
    from prefixserve.server.schemas import DEFAULTS

    monkeypatch.setenv("PREFIXSERVE_MAX_BATCH_SIZE", "16")
    monkeypatch.setenv("PREFIXSERVE_STORE", "memory://")
    monkeypatch.setenv("PREFIXSERVE_DEFAULT_LIMITS", '{"requests_per_s": 5, "max_concurrent": 2}')
    s = parse()
    assert s.max_batch_size == 16 and s.store == "memory://" and s.default_limits.requests_per_s == 5
    assert s.replicas == DEFAULTS.replicas == 1 and s.backbone == DEFAULTS.backbone
    assert parse("--max-batch-size", "8").max_batch_size == 8
    assert DEFAULTS.max_batch_size == 32  # the written defaults ignore the env


def test_nested_env_and_replicas_flag(monkeypatch):
    monkeypatch.setenv("PREFIXSERVE_AUTOSCALING", '{"min_replicas": 1, "max_replicas": 3}')
    s = parse()
    assert (s.autoscaling.min_replicas, s.autoscaling.max_replicas) == (1, 3)
    assert parse("--replicas", "2").autoscaling is None  # the flag beats the env's autoscaling
    assert parse("--target-ongoing", "4").autoscaling.target_ongoing_requests == 4
    assert parse("--autoscale", "2:5").autoscaling.max_replicas == 5


def test_bad_env_is_one_error_line(monkeypatch, capsys):
    from prefixserve.server.main import main

    monkeypatch.setenv("PREFIXSERVE_MAX_BATCH_SIZE", "lots")
    assert main(["serve", "--store", "memory://"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and '"bad_settings"' in err[0] and "max_batch_size" in err[0]


def test_legacy_names_and_extra_forbid(monkeypatch):
    from pydantic import ValidationError

    from prefixserve.server.schemas import AppSettings

    monkeypatch.setenv("NUM_REPLICAS", "7")  # an alias is never read as an unprefixed env var
    s = AppSettings.model_validate({"num_replicas": 2, "backbone_num_cpus": 0.5, "autoscaling_config": None})
    assert (s.replicas, s.worker_num_cpus) == (2, 0.5)
    assert AppSettings().replicas == 1
    with pytest.raises(ValidationError):
        AppSettings.model_validate({"bogus": 1})


def test_replicas_get_the_resolved_values(monkeypatch):
    from prefixserve.server.schemas import AppSettings

    monkeypatch.setenv("PREFIXSERVE_MAX_INPUTS", "5")
    s = AppSettings()
    monkeypatch.setenv("PREFIXSERVE_MAX_INPUTS", "9")  # a replica's env differs: it does not matter
    assert pickle.loads(pickle.dumps(s)).max_inputs == 5


def test_help_shows_each_default_once_with_env_name():
    from prefixserve.server.main import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    text = " ".join(serve.format_help().split())
    for flag, env, default in (
        ("--max-batch-size", "PREFIXSERVE_MAX_BATCH_SIZE", "32"),
        ("--replicas", "PREFIXSERVE_REPLICAS", "1"),
        ("--backbone", "PREFIXSERVE_BACKBONE", "klue/roberta-base"),
    ):
        assert flag in text and f"(default: {default}; env {env})" in text
    assert text.count("PREFIXSERVE_MAX_BATCH_SIZE") == 1 and "PREFIXSERVE_MAX_UPLOAD_BYTES (default:" in text
    assert "None (default" not in text
