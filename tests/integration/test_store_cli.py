"""`prefixserve store ...` and `prefixserve tenant ...` end to end, on a file store and on redis."""

from __future__ import annotations

import json

import pytest

from prefixserve.server.main import main


@pytest.fixture(scope="module")
def packed_file(tmp_path_factory):
    torch = pytest.importorskip("torch")
    from prefixserve.adapters.format import dump_packed

    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "SEQ_CLS",
        "num_virtual_tokens": 3,
        "token_dim": 16,
        "num_layers": 2,
        "num_attention_heads": 2,
    }
    tensors = {
        "prompt_embeddings": torch.ones(3, 16),  # (Q, hidden) for a prompt
        "base_model.classifier.weight": torch.zeros(2, 16),
        "base_model.classifier.bias": torch.zeros(2),
    }
    path = tmp_path_factory.mktemp("packed") / "a.safetensors"
    path.write_bytes(dump_packed(config, tensors, ["no", "yes"], "sha256:cli-test"))
    return path


@pytest.fixture(params=["file", "redis"])
def store_url(request, tmp_path):
    if request.param == "file":
        return f"file://{tmp_path}/store"
    server = request.getfixturevalue("redis_server")
    return f"{server.url}?prefix={request.getfixturevalue('redis_prefix')}"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_operator_workflow(capsys, store_url, packed_file, tmp_path):
    rc, out, _ = run(capsys, "tenant", "create", "acme", "--store", store_url, "--max-adapters", "2", "--json")
    assert rc == 0
    key = json.loads(out)["api_key"]
    assert key.startswith("psk_")
    rc, _, err = run(capsys, "tenant", "create", "acme", "--store", store_url)
    assert rc == 2 and json.loads(err.splitlines()[0])["error"]["code"] == "conflict"

    s = ["--store", store_url, "--tenant", "acme"]
    for _ in range(2):
        rc, out, _ = run(capsys, "store", "push", "intent", str(packed_file), *s, "--json")
        assert rc == 0
    assert json.loads(out)["version"] == 2 and json.loads(out)["meta"]["kind"] == "prompt"
    rc, out, _ = run(capsys, "store", "ls", *s)
    assert rc == 0 and out.splitlines()[0].split()[:3] == ["ID", "VERSION", "SIZE"] and "no,yes" in out
    rc, out, _ = run(capsys, "store", "versions", "intent", *s, "--json")
    assert [v["version"] for v in json.loads(out)] == [1, 2]
    dest = tmp_path / "pulled.safetensors"
    rc, _, _ = run(capsys, "store", "pull", "intent", "-o", str(dest), "--version", "1", *s)
    assert rc == 0 and dest.read_bytes() == packed_file.read_bytes()

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    rc, _, err = run(capsys, "store", "push", "intent", str(bad), *s)
    assert rc == 2 and json.loads(err)["error"]["code"] in (
        "bad_header",
        "header_too_large",
        "missing_metadata",
        "not_safetensors",
    )
    rc, _, err = run(capsys, "store", "push", "../escape", str(packed_file), *s)
    assert rc == 2 and json.loads(err)["error"]["code"] == "invalid_id"
    rc, _, err = run(capsys, "store", "ls", "--store", store_url, "--tenant", "nobody")
    assert rc == 2 and json.loads(err)["error"]["code"] == "not_found"

    rc, out, _ = run(capsys, "tenant", "list", "--store", store_url, "--json")
    (acme,) = json.loads(out)
    assert acme["name"] == "acme" and acme["adapters"] == 1 and acme["quota"]["max_adapters"] == 2
    rc, out, _ = run(capsys, "tenant", "rotate-key", "acme", "--store", store_url)
    assert rc == 0 and out.strip().startswith("psk_") and out.strip() != key
    rc, out, _ = run(
        capsys, "tenant", "quota", "acme", "--store", store_url, "--max-adapters", "0", "--max-bytes", "0", "--json"
    )
    assert json.loads(out)["quota"] == {"max_adapters": 0, "max_bytes": 0}
    rc, _, _ = run(capsys, "store", "rm", "intent", *s)
    assert rc == 0
    rc, _, _ = run(capsys, "tenant", "delete", "acme", "--store", store_url)
    assert rc == 2  # needs --yes
    rc, _, _ = run(capsys, "tenant", "delete", "acme", "--store", store_url, "--yes")
    rc, out, _ = run(capsys, "tenant", "list", "--store", store_url)
    assert rc == 0 and out.strip() == "(none)"


def test_help_and_missing_store(capsys, monkeypatch):
    monkeypatch.delenv("PREFIXSERVE_STORE", raising=False)
    with pytest.raises(SystemExit):
        main(["store", "--help"])
    assert "push" in capsys.readouterr().out
    rc, _, err = run(capsys, "store", "ls", "--tenant", "acme")
    assert rc == 2 and "PREFIXSERVE_STORE" in err


def test_tenant_limits(capsys, store_url):
    rc, _, _ = run(capsys, "tenant", "create", "acme", "--store", store_url)
    assert rc == 0
    t = ["--store", store_url]
    rc, out, _ = run(capsys, "tenant", "limits", "acme", *t, "--json")
    assert rc == 0 and json.loads(out)["limits"] is None  # the server's default
    rc, out, _ = run(capsys, "tenant", "limits", "acme", *t)
    assert out.splitlines()[1].split() == ["acme", "default", "default", "default", "default"]
    rc, out, _ = run(capsys, "tenant", "limits", "acme", *t, "--requests-per-s", "5", "--max-concurrent", "2", "--json")
    assert rc == 0
    assert json.loads(out)["limits"] == {"requests_per_s": 5.0, "rows_per_s": 0.0, "burst_s": 2.0, "max_concurrent": 2}
    rc, out, _ = run(capsys, "tenant", "limits", "acme", *t, "--rows-per-s", "250.5", "--burst-s", "1")
    assert rc == 0 and out.splitlines()[0].split() == [
        "TENANT",
        "REQUESTS_PER_S",
        "ROWS_PER_S",
        "BURST_S",
        "MAX_CONCURRENT",
    ]
    assert out.splitlines()[1].split() == ["acme", "5.0", "250.5", "1.0", "2"]  # the other fields kept their values
    rc, out, _ = run(capsys, "tenant", "list", *t, "--json")
    assert json.loads(out)[0]["limits"]["rows_per_s"] == 250.5
    for bad in (["--requests-per-s", "-1"], ["--default", "--rows-per-s", "1"]):
        rc, _, err = run(capsys, "tenant", "limits", "acme", *t, *bad)
        assert rc == 2 and json.loads(err)["error"]["code"] == "bad_limits"
    rc, out, _ = run(capsys, "tenant", "limits", "acme", *t, "--default", "--json")
    assert rc == 0 and json.loads(out)["limits"] is None
    rc, _, err = run(capsys, "tenant", "limits", "nobody", *t, "--max-concurrent", "1")
    assert rc == 2 and json.loads(err)["error"]["code"] == "not_found"
