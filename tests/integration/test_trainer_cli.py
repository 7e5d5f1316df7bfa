"""CLI smoke tests for train / pretrain / experiment through ``prefixserve.server.main.main``."""

from __future__ import annotations

import json
import threading
from dataclasses import MISSING, Field, fields
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from prefixserve.adapters.format import load_packed
from prefixserve.server.main import build_parser, main
from prefixserve.trainer.config import ExperimentConfig, PretrainConfig, TrainConfig
from tests.integration.test_trainer import FILLER, NEG, POS, write_tsv

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def server():
    """A loopback HTTP server recording PUTs and answering 201 with a JSON body."""
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_PUT(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append({"path": self.path, "headers": dict(self.headers), "body": body})
            prefix_id = self.path.rsplit("/", 1)[-1]
            meta = {"prefix_id": prefix_id, "version": 1, "sha256": "s", "kind": "prefix"}
            reply = json.dumps(meta | {"labels": ["negative", "positive"], "bytes": len(body)}).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, *args):
            pass

    httpd = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", received
    httpd.shutdown()
    httpd.server_close()


def test_train_cli_writes_adapter_log_and_uploads(tiny_backbones, tmp_path, server, capsys):
    url, received = server
    train_file = write_tsv(tmp_path / "train.tsv", 64, 0, extra="99\t\t1\nbroken line\n")
    out = tmp_path / "adapter.safetensors"
    rc = main(
        [
            "train",
            "--backbone",
            tiny_backbones["bert"],
            "--train",
            train_file,
            "--eval-split",
            "0.25",
            "--kind",
            "prefix",
            "--num-virtual-tokens",
            "3",
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--label-names",
            "negative,positive",
            "--no-progress",
            "--out",
            str(out),
            "--upload",
            url,
            "--prefix-id",
            "sentiment-v1",
            "--api-key",
            "sk-test",
        ]
    )
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (summary["upload"]["prefix_id"], summary["upload"]["version"]) == ("sentiment-v1", 1)
    meta = load_packed(out.read_bytes()).meta
    assert meta.labels == ("negative", "positive") and meta.num_virtual_tokens == 3
    log = json.loads((tmp_path / "adapter.safetensors.log.json").read_text())
    assert log["bad_rows"]["train"] == {"missing_text": 1, "unparsable": 1}
    assert log["train_rows"] == 48 and log["eval_rows"] == 16
    (req,) = received
    assert req["path"] == "/v1/prefixes/sentiment-v1" and req["body"] == out.read_bytes()
    assert req["headers"]["Authorization"] == "Bearer sk-test"
    assert req["headers"]["Content-Type"] == "application/octet-stream"


def test_cli_errors_are_json_and_exit_2(tiny_backbones, tmp_path, capsys):
    rc = main(
        [
            "train",
            "--backbone",
            tiny_backbones["bert"],
            "--train",
            str(tmp_path / "missing.tsv"),
            "--out",
            str(tmp_path / "x.safetensors"),
            "--no-progress",
        ]
    )
    assert rc == 2
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["error"]["code"] == "file_not_found"


def test_pretrain_then_train_init_from_cli(tiny_backbones, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(" ".join((FILLER + POS + NEG)[(i * 7 + j) % 20] for j in range(8)) for i in range(32)))
    prefix = tmp_path / "prefix.safetensors"
    assert (
        main(
            [
                "pretrain",
                "--backbone",
                tiny_backbones["roberta"],
                "--corpus",
                str(corpus),
                "--num-virtual-tokens",
                "3",
                "--steps",
                "4",
                "--batch-size",
                "8",
                "--no-progress",
                "--out",
                str(prefix),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["steps"] == 4
    train_file = write_tsv(tmp_path / "train.tsv", 32, 0)
    out = tmp_path / "a.safetensors"
    assert (
        main(
            [
                "train",
                "--backbone",
                tiny_backbones["roberta"],
                "--train",
                train_file,
                "--epochs",
                "1",
                "--init-from",
                str(prefix),
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert load_packed(out.read_bytes()).meta.num_virtual_tokens == 3
    # a prefix pre-trained on another backbone is refused with a clear code
    assert (
        main(
            [
                "train",
                "--backbone",
                tiny_backbones["bert"],
                "--train",
                train_file,
                "--epochs",
                "1",
                "--init-from",
                str(prefix),
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["error"]["code"] == "backbone_mismatch"


def test_experiment_table1_cli(tiny_backbones, tmp_path, capsys):
    train_file = write_tsv(tmp_path / "train.tsv", 32, 0)
    eval_file = write_tsv(tmp_path / "eval.tsv", 16, 1)
    out = tmp_path / "t1"
    assert (
        main(
            [
                "experiment",
                "table1",
                "--backbone",
                tiny_backbones["bert"],
                "--train",
                train_file,
                "--eval",
                eval_file,
                "--lengths",
                "2,4,500",
                "--epochs",
                "1",
                "--batch-size",
                "16",
                "--no-progress",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "table1.json").read_text())
    names = [r["row"] for r in report["rows"]]
    assert names == [
        "linear probe (frozen, head only)",
        "prefix P=2 (frozen)",
        "prefix P=4 (frozen)",
        "full fine-tuning",
        "prefix P=2 + full fine-tuning",
    ]
    assert [r["servable"] for r in report["rows"]] == [False, True, True, False, False]
    assert report["skipped"] and "P=500" in report["skipped"][0]
    probe, ft = report["rows"][0], report["rows"][3]
    assert probe["trainable_params"] < report["rows"][1]["trainable_params"] < ft["trainable_params"]
    assert all(0 <= r["accuracy"] <= 1 and r["peak_memory_bytes"] > 0 for r in report["rows"])
    assert "| linear probe" in (out / "table1.md").read_text()


def test_help_lists_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "--num-virtual-tokens" in text and "default: 0.01" in text


def _default(f: Field[Any]) -> object:
    return f.default_factory() if f.default_factory is not MISSING else f.default


@pytest.mark.parametrize(
    "argv,config_cls",
    [
        (["train", "--backbone", "b", "--train", "t", "--out", "o"], TrainConfig),
        (["pretrain", "--backbone", "b", "--corpus", "c", "--out", "o"], PretrainConfig),
        (["experiment", "table1", "--backbone", "b", "--train", "t", "--out", "o"], ExperimentConfig),
    ],
)
def test_cli_options_are_the_config_fields(argv, config_cls, capsys):
    """The options are generated from the config dataclasses: same names, same defaults, each shown in --help."""
    args = vars(build_parser().parse_args(argv))
    given = {"backbone", "train", "corpus", "out"}
    code_only = {"train_backbone", "max_grad_norm"}
    for f in fields(config_cls):
        if f.name in code_only:
            assert f.name not in args
            continue
        assert f.name in given or args[f.name] == _default(f), f.name
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv[: 2 if argv[0] == "experiment" else 1], "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal width
    for f in fields(config_cls):
        if f.name not in code_only:
            assert ("--no-" if f.default is True else "--") + f.name.replace("_", "-") in text
            if _default(f) not in (None, True, MISSING) and f.name not in given:
                assert f"default: {_default(f)}" in text, f.name
