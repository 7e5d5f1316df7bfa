"""Offline batch job: order kept, bad lines answered with errors, others still answered."""

from __future__ import annotations

import json

import pytest

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.peft_io import pack_folder
from prefixserve.server.main import main
from tests.fixtures.backbones import make_peft_adapter, peft_logits

FP32 = ["--dtype", "float32"]  # compared with references at 1e-5; "auto" is bf16 on AMX / AVX512-BF16 CPUs


@pytest.fixture(scope="module")
def job(tiny_backbones, tmp_path_factory):
    bdir = tiny_backbones["bert"]
    root = tmp_path_factory.mktemp("job")
    fp = load_backbone(bdir).fingerprint
    prefix_dir = make_peft_adapter(bdir, root / "prefix", "prefix", 5, 2, seed=1)
    prompt_dir = make_peft_adapter(bdir, root / "prompt", "prompt", 3, 3, seed=2)
    packed = root / "prompt.safetensors"
    packed.write_bytes(pack_folder(prompt_dir, labels=["a", "b", "c"], fingerprint=fp))
    (root / "corrupt.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    lines = [
        {"adapter": prefix_dir, "text": "great film"},  # PEFT folder without sidecar
        {"adapter": str(packed), "text": "정말 재미 있다", "text_pair": "bad plot"},
        "{not json",
        {"adapter": str(root / "missing.safetensors"), "text": "x"},
        {"adapter": str(root / "corrupt.safetensors"), "text": "x"},
        {"text": "no adapter"},
        {"adapter": prefix_dir, "text": "terrible movie"},
    ]
    inp = root / "requests.jsonl"
    inp.write_text("\n".join(x if isinstance(x, str) else json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    return bdir, root, inp, prefix_dir


def test_each_line_answered_in_order(job):
    bdir, root, inp, prefix_dir = job
    out = root / "out.jsonl"
    assert (
        main(["predict", "--backbone", bdir, "--input", str(inp), "--output", str(out), "--batch-size", "2", *FP32])
        == 0
    )
    res = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(res) == 7
    assert [r.get("error", {}).get("code") for r in res] == [
        None,
        None,
        "bad_json",
        "adapter_not_found",
        "bad_header",
        "missing_adapter",
        None,
    ]
    assert set(res[1]["scores"]) == {"a", "b", "c"} and res[1]["label"] in "abc"
    backbone = load_backbone(bdir)
    ref, _ = peft_logits(bdir, prefix_dir, 2, backbone.tokenizer, ["great film", "terrible movie"])
    for r, want in zip([res[0], res[6]], ref):
        assert max(abs(a - b) for a, b in zip(r["logits"], want.tolist())) <= 1e-5
    assert all(isinstance(r["error"]["message"], str) for r in res if "error" in r)


def test_exit_status_nonzero_only_if_nothing_answered(job, tmp_path):
    bdir, root, _, _ = job
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n" + json.dumps({"adapter": "nope", "text": "x"}) + "\n")
    assert main(["predict", "--backbone", bdir, "--input", str(bad), "--output", str(tmp_path / "o.jsonl")]) == 1
    assert len((tmp_path / "o.jsonl").read_text().splitlines()) == 2


def test_pack_unpack_inspect_cli(job, tmp_path, capsys):
    bdir, root, _, prefix_dir = job
    out = tmp_path / "a.safetensors"
    assert main(["pack", prefix_dir, "-o", str(out), "--backbone", bdir, "--labels", "neg,pos"]) == 0
    assert main(["inspect", str(out)]) == 0
    meta = json.loads(capsys.readouterr().out)
    assert meta["labels"] == ["neg", "pos"] and meta["kind"] == "prefix"
    assert main(["unpack", str(out), "-o", str(tmp_path / "peft")]) == 0
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert main(["inspect", str(root / "corrupt.safetensors")]) == 2


def test_every_kind_in_one_job(tiny_backbones, tmp_path):
    """LoRA and IA3 PEFT folders, an AdapterHub bottleneck folder and a packed file in one job: each line equals
    its reference (PEFT's logits; the engine on the packed adapter for the AdapterHub folder)."""
    from prefixserve.adapters.bottleneck import hub_io
    from prefixserve.adapters.engine import Engine, Row
    from prefixserve.adapters.format import load_packed
    from prefixserve.adapters.synthetic import random_adapter

    bdir = tiny_backbones["roberta"]
    bb = load_backbone(bdir)
    lora = make_peft_adapter(bdir, tmp_path / "lora", "lora", 0, 2, seed=3, scale=0.3)
    ia3 = make_peft_adapter(bdir, tmp_path / "ia3", "ia3", 0, 2, seed=4)
    packed = random_adapter(bb.config, bb.fingerprint, kind="bottleneck", labels=["neg", "pos"], seed=5)
    af = load_packed(packed)
    hub = hub_io.to_hub_folder(af.peft_config, af.tensors, tmp_path / "hub", "roberta", labels=["neg", "pos"])
    lora_packed = tmp_path / "lora.safetensors"
    lora_packed.write_bytes(pack_folder(lora, fingerprint=bb.fingerprint))
    texts = ["great film", "terrible movie", "a story"]
    lines = [{"adapter": str(a), "text": t} for t in texts for a in (lora, ia3, hub, lora_packed)]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert (
        main(["predict", "--backbone", bdir, "--input", str(inp), "--output", str(out), "--batch-size", "5", *FP32])
        == 0
    )
    res = [json.loads(x) for x in out.read_text().splitlines()]
    assert not [r for r in res if "error" in r], res
    refs = {
        str(lora): peft_logits(bdir, lora, 2, bb.tokenizer, texts)[0],
        str(ia3): peft_logits(bdir, ia3, 2, bb.tokenizer, texts)[0],
        str(lora_packed): peft_logits(bdir, lora, 2, bb.tokenizer, texts)[0],
    }
    engine = Engine(bb)
    hub_adapter = engine.adapter("hub", lambda: packed)
    refs[str(hub)] = [p.logits for p in engine.predict([Row(hub_adapter, t) for t in texts])]
    for line, r in zip(lines, res):
        want = refs[line["adapter"]][texts.index(line["text"])]
        want = want.tolist() if hasattr(want, "tolist") else want
        assert max(abs(a - b) for a, b in zip(r["logits"], want)) <= 1e-5, line
    assert {r["label"] for r, line in zip(res, lines) if line["adapter"] == str(hub)} <= {"neg", "pos"}
