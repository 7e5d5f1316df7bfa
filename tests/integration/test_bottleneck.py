"""Bottleneck adapters equal AdapterHub's equations run inside transformers' own BERT / RoBERTa forward.

The reference is independent of :mod:`prefixserve.adapters.bottleneck.model`: transformers' ``BertModel`` /
``RobertaModel`` with the ``forward`` of ``encoder.layer[i].attention.output`` (BertSelfOutput) and
``encoder.layer[i].output`` (BertOutput) replaced by AdapterHub's ``BertSelfOutputWithAdapters`` /
``BertOutputWithAdapters`` forward with one active ``Adapter``, transcribed from adapter-hub/adapters
(``models/bert/modeling_bert.py``, ``methods/modeling.py`` pre_forward / forward / post_forward). Each row
runs alone there; here all rows share one packed batch, different adapters on different row segments.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

from prefixserve.adapters import bottleneck
from prefixserve.adapters.bottleneck import BottleneckAdapter, BottleneckConfig
from prefixserve.adapters.encoder import PackedEncoder
from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.adapters.rowkinds import SegmentHooks
from tests.fixtures.bottleneck_ref import hooked, random_body

TOL = 1e-5
PF, HB = BottleneckConfig.pfeiffer, BottleneckConfig.houlsby
CONFIGS = {  # every branch of pre_forward / post_forward, both presets
    "pfeiffer": PF(reduction_factor=4).to_config_dict(),
    "houlsby": HB(reduction_factor=8).to_config_dict(),
    "pfeiffer_post_add": PF(reduction_factor=2, residual_before_ln="post_add", scaling=2.0).to_config_dict(),
    "pfeiffer_rbl_false_gelu_new": PF(residual_before_ln=False, non_linearity="gelu_new").to_config_dict(),
    "houlsby_no_ln_after": HB(original_ln_after=False, non_linearity="tanh", scaling=0.5).to_config_dict(),
    "houlsby_rbl_false_mapping": HB(
        residual_before_ln=False, reduction_factor={"0": 2, "default": 16}
    ).to_config_dict(),
    "houlsby_leave_out": HB(leave_out=[0], non_linearity="gelu", reduction_factor=0.5).to_config_dict(),
    "mh_only_leakyrelu": HB(output_adapter=False, non_linearity="LeakyReLU").to_config_dict(),
}


@pytest.fixture(scope="module", params=["bert", "roberta"])
def models(request, tiny_backbones, one_thread):
    hf = AutoModel.from_pretrained(tiny_backbones[request.param]).eval()
    return hf, PackedEncoder.from_hf(hf).eval()


def hf_row(hf, ids: list[int]) -> torch.Tensor:
    return hf(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0][0]


def rows(hf, n: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [7, 3, 12, 1, 9, 5][:n]
    return [torch.randint(5, hf.config.vocab_size, (k,), generator=g).tolist() for k in lengths]


@torch.no_grad()
def test_parity_per_row_segments(models):
    """Six rows, four adapters of different configs (and one plain row) in ONE packed batch vs the reference."""
    hf, enc = models
    h, n_layers = hf.config.hidden_size, hf.config.num_hidden_layers
    names = list(CONFIGS)
    ids = rows(hf, 6, seed=1)
    for start in range(0, len(names), 4):  # every config, four per batch
        chosen = names[start : start + 4]
        plan = [chosen[0], chosen[0], None, chosen[1], chosen[2], chosen[3 % len(chosen)]]  # row -> config
        bodies = {c: random_body(CONFIGS[c], h, n_layers, seed=k) for k, c in enumerate(chosen)}
        adapters = {c: bottleneck.build(CONFIGS[c], bodies[c]) for c in chosen}
        batch = enc.pack(ids)
        cu = batch.cu_seqlens.tolist()
        segments, r = [], 0
        while r < len(plan):  # consecutive rows of one adapter form one segment
            e = r
            while e + 1 < len(plan) and plan[e + 1] == plan[r]:
                e += 1
            if plan[r] is not None:
                segments.append((cu[r], cu[e + 1], adapters[plan[r]]))
            r = e + 1
        batch.hooks = SegmentHooks(segments)
        hidden = enc(batch)  # (T, H)
        for r, c in enumerate(plan):
            ours = hidden[cu[r] : cu[r + 1]]  # (n, H)
            with hooked(hf, CONFIGS[c] if c else None, bodies[c] if c else None):
                ref = hf_row(hf, ids[r])
            diff = (ours - ref).abs().max().item()
            assert diff <= TOL, (c, r, diff)
            if c is not None:
                plain = hf_row(hf, ids[r])
                assert (ours - plain).abs().max().item() > 1e-3, f"{c} does not move row {r}"


def test_gradients_reach_every_adapter_tensor(models):
    hf, enc = models
    for cfg in (PF(reduction_factor=4), HB(reduction_factor=8)):
        adapter = BottleneckAdapter.init(cfg, hf.config)
        ids = rows(hf, 3, seed=2)
        batch = enc.pack(ids)
        batch.hooks = SegmentHooks([(0, batch.num_tokens, adapter)])
        enc.requires_grad_(False)
        enc(batch).pow(2).sum().backward()
        named = dict(adapter.named_parameters())
        assert len(named) == 4 * len(cfg.locations(hf.config.num_hidden_layers))
        for name, param in named.items():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_init_body_build_round_trip(models):
    hf, _ = models
    torch.manual_seed(0)
    cfg = HB(reduction_factor=4)
    adapter = BottleneckAdapter.init(cfg, hf.config)
    body = adapter.body()
    h = hf.config.hidden_size
    assert sorted(body) == sorted(random_body(cfg.to_config_dict(), h, hf.config.num_hidden_layers, 0))
    weights = torch.cat([v.flatten() for k, v in body.items() if k.endswith("weight")])
    assert 0.01 < weights.std().item() < 0.03  # init_bert_weights: normal(0, 0.02)
    assert all(v.abs().sum() == 0 for k, v in body.items() if k.endswith("bias"))
    assert bottleneck.check(cfg.to_config_dict(), body) == bottleneck.check(cfg.to_config_dict(), body)
    shape = bottleneck.check(cfg.to_config_dict(), body)
    assert (shape.num_layers, shape.hidden) == (hf.config.num_hidden_layers, h)
    again = bottleneck.build(cfg.to_config_dict(), body).body()
    assert all(torch.equal(again[k], body[k]) for k in body) and set(again) == set(body)


# ---- AdapterHub folders ------------------------------------------------------------------------------------


def _head(style: str, h: int = 32, c: int = 3) -> dict[str, torch.Tensor]:
    if style == "roberta":
        shapes = {"dense.weight": (h, h), "dense.bias": (h,), "out_proj.weight": (c, h), "out_proj.bias": (c,)}
    else:
        shapes = {"weight": (c, h), "bias": (c,)}
    return {f"base_model.classifier.{k}": torch.randn(s) for k, s in shapes.items()}


@pytest.mark.parametrize("style", ["roberta", "bert"])
def test_hub_folder_round_trip_and_key_names(tmp_path, style):
    config = CONFIGS["houlsby_leave_out"] | {"leave_out": [1]}
    tensors = random_body(config, 32, 2, seed=3) | _head(style)
    out = bottleneck.to_hub_folder(config, tensors, tmp_path / "a", style, name="sst2", labels=["a", "b", "c"])
    back_config, back = bottleneck.from_hub_folder(out)
    assert back_config == config
    assert set(back) == set(tensors) and all(torch.equal(back[k], tensors[k]) for k in tensors)
    assert bottleneck.hub_labels(out) == ["a", "b", "c"]
    # names as AdapterHub writes them (utils.py file names; state-dict keys of BertAdapterModel/RobertaAdapterModel)
    assert sorted(p.name for p in out.iterdir()) == [
        "adapter.safetensors",
        "adapter_config.json",
        "head_config.json",
        "model_head.safetensors",
    ]
    keys = set(load_file(str(out / "adapter.safetensors")))
    assert f"{style}.encoder.layer.0.attention.output.adapters.sst2.adapter_down.0.weight" in keys
    assert f"{style}.encoder.layer.0.output.adapters.sst2.adapter_up.bias" in keys
    assert len(keys) == 8  # layer 1 left out: 2 blocks x 4 tensors
    head_keys = set(load_file(str(out / "model_head.safetensors")))
    indices = ["1", "4"] if style == "roberta" else ["1"]
    assert head_keys == {f"heads.sst2.{i}.{p}" for i in indices for p in ("weight", "bias")}
    meta = json.loads((out / "adapter_config.json").read_text())
    assert meta["name"] == "sst2" and meta["version"].startswith("adapters.") and "peft_type" not in meta["config"]
    hc = json.loads((out / "head_config.json").read_text())["config"]
    assert (hc["layers"], hc["use_pooler"], hc["num_labels"]) == ((2, False, 3) if style == "roberta" else (1, True, 3))


def test_hub_folder_refusals(tmp_path):
    config = CONFIGS["pfeiffer"]
    tensors = random_body(config, 32, 2, seed=4) | _head("roberta")
    out = bottleneck.to_hub_folder(config, tensors, tmp_path / "a", "roberta")
    (out / "adapter.safetensors").rename(out / "pytorch_adapter.bin")  # never unpickled: refused by name
    with pytest.raises(InvalidAdapterError) as e:
        bottleneck.from_hub_folder(out)
    assert e.value.code == "pickle_refused"

    out = bottleneck.to_hub_folder(config, tensors, tmp_path / "b", "roberta")
    meta = json.loads((out / "head_config.json").read_text())
    meta["config"]["layers"] = 3
    (out / "head_config.json").write_text(json.dumps(meta))
    with pytest.raises(InvalidAdapterError) as e:
        bottleneck.from_hub_folder(out)
    assert e.value.code == "bad_head"

    with pytest.raises(InvalidAdapterError) as e:  # a bert head with its own pooler: no AdapterHub layout
        pooler = {
            "base_model.bert.pooler.dense.weight": torch.randn(32, 32),
            "base_model.bert.pooler.dense.bias": torch.randn(32),
        }
        bottleneck.to_hub_folder(config, random_body(config, 32, 2, 4) | _head("bert") | pooler, tmp_path / "c", "bert")
    assert e.value.code == "bad_head"


def test_hub_legacy_activation_rename(tmp_path):
    """Configs saved without "version" (adapter-transformers v1/v2): gelu meant gelu_new (utils.ACTIVATION_RENAME)."""
    config = PF(non_linearity="gelu").to_config_dict()
    out = bottleneck.to_hub_folder(config, random_body(config, 32, 2, seed=5), tmp_path / "a", "bert")
    meta = json.loads((out / "adapter_config.json").read_text())
    del meta["version"]
    (out / "adapter_config.json").write_text(json.dumps(meta))
    back, _ = bottleneck.from_hub_folder(out)
    assert back["non_linearity"] == "gelu_new"


def test_hub_static_head_and_preset_name(tmp_path):
    """A static-head model's head (``classifier.*``, head config null) and a config given as "pfeiffer"."""
    config = PF().to_config_dict()
    tensors = random_body(config, 32, 2, seed=6) | _head("roberta")
    out = bottleneck.to_hub_folder(config, tensors, tmp_path / "a", "roberta")
    meta = json.loads((out / "adapter_config.json").read_text())
    meta["config"] = "pfeiffer"
    (out / "adapter_config.json").write_text(json.dumps(meta))
    head = json.loads((out / "head_config.json").read_text())
    head["config"] = None
    (out / "head_config.json").write_text(json.dumps(head))
    static = {k.replace("base_model.", ""): v for k, v in _head("roberta").items()}  # classifier.dense.weight ...
    save_file(static, str(out / "model_head.safetensors"))
    back_config, back = bottleneck.from_hub_folder(out)
    assert BottleneckConfig.from_config_dict(back_config) == PF()
    assert all(torch.equal(back["base_model." + k], v) for k, v in static.items())
