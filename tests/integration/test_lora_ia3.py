"""LoRA and IA3 rows equal PEFT's own PeftModel (fp32, 1e-5), each row of ONE packed batch with its own adapter.

Also: PEFT folder -> from_peft -> to_peft -> PeftModel.from_pretrained round trip, init() + to_config_dict() as
PEFT reads them, and gradients through the encoder for training.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from prefixserve.adapters import ia3, lora
from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.heads import ClassificationHead, split_head
from prefixserve.adapters.peft_weights import from_peft, to_peft
from prefixserve.adapters.rowkinds import MODULES, SegmentHooks
from tests.fixtures.backbones import peft_logits

TOL = 1e-5
MOVES = 1e-3  # an adapter must move some logit by more than this
KINDS: dict[str, Any] = {"LORA": lora, "IA3": ia3}
# name, peft_type, PEFT config kwargs, num_labels
ADAPTERS: list[tuple[str, str, dict[str, Any], int]] = [
    ("lora_qv", "LORA", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}, 2),
    ("lora_rs_all", "LORA", {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": list(MODULES)}, 3),
    (
        "lora_patterns",
        "LORA",
        {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": r".*\.(query|key|intermediate\.dense)",
            "rank_pattern": {"key": 2, r"layer\.1\.attention\.self\.query": 6},
            "alpha_pattern": {"intermediate.dense": 3},
        },
        2,
    ),
    (
        "lora_layers",
        "LORA",
        {"r": 3, "lora_alpha": 5, "target_modules": ["key", "output.dense"], "layers_to_transform": [1]},
        4,
    ),
    ("ia3_default", "IA3", {}, 2),
    (
        "ia3_q_inter",
        "IA3",
        {"target_modules": ["query", "intermediate.dense"], "feedforward_modules": ["intermediate.dense"]},
        3,
    ),
    (
        "ia3_ff_qkv",  # a feed-forward value (recomputed inside the fused qkv) next to a plain key
        "IA3",
        {
            "target_modules": ["key", "value", "attention.output.dense"],
            "feedforward_modules": ["value", "attention.output.dense"],
        },
        2,
    ),
]
TEXTS = [
    "a",
    "bad plot and terrible actors were not fun at all, nothing worked",
    "great film",
    "i love this story and its music",
    "boring boring boring boring",
    "the end",
    "what a ride from start to finish, with twists i never saw coming",
]


def make_weight_adapter(bdir: str, out: Path, peft_type: str, kwargs: dict, num_labels: int, seed: int) -> Path:
    """A PEFT SEQ_CLS LoRA / IA3 folder with random non-trivial weights (B != 0, ia3_l != 1) and head."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    torch.manual_seed(seed)
    base = AutoModelForSequenceClassification.from_pretrained(bdir, num_labels=num_labels)
    config = (LoraConfig if peft_type == "LORA" else IA3Config)(task_type="SEQ_CLS", **kwargs)
    model = get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn_like(p))  # around PEFT's identity init
            elif "lora_" in name:
                p.normal_(0.0, 0.15)
            elif p.requires_grad:  # the head (and BERT's pooler): logits well away from 0
                p.normal_(0.0, 1.0)
    model.save_pretrained(str(out))
    return out


def read_folder(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return config, load_file(str(folder / "adapter_model.safetensors"))


def split(packed: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(body, stripped head) of packed tensors."""
    body = {k: v for k, v in packed.items() if not k.startswith("base_model.")}
    return body, split_head(packed)


@pytest.fixture(scope="module", params=["bert", "roberta"])
def setup(request, tiny_backbones, tmp_path_factory, one_thread):
    arch = request.param
    bdir = tiny_backbones[arch]
    bb = load_backbone(bdir, device="cpu", dtype="float32")
    adapters = []
    for k, (name, peft_type, kwargs, c) in enumerate(ADAPTERS):
        if arch == "bert" and name == "lora_patterns":  # BERT's pooler trained and saved with the head
            kwargs = {**kwargs, "modules_to_save": ["pooler"]}
        folder = make_weight_adapter(bdir, tmp_path_factory.mktemp(f"{arch}-{name}"), peft_type, kwargs, c, seed=k)
        config, tensors = read_folder(folder)
        body, head = split(from_peft(config, tensors))
        kind = KINDS[peft_type]
        kind.check(config, body)
        adapters.append((name, folder, config, c, kind.build(config, body), ClassificationHead.from_tensors(head)))
    return arch, bdir, bb, adapters


def run(bb, rows: list[tuple[str, Any]]) -> tuple[torch.Tensor, Any]:
    """Hidden (T, H) and the batch for rows (text, adapter module or None), all in ONE packed forward."""
    enc, tok = bb.encoder, bb.tokenizer
    encoded = [tok(text) for text, _ in rows]
    batch = enc.pack(
        [e["input_ids"] for e in encoded], [e.get("token_type_ids", [0] * len(e["input_ids"])) for e in encoded]
    )
    cu = batch.cu_seqlens.tolist()
    batch.hooks = SegmentHooks([(cu[i], cu[i + 1], a) for i, (_, a) in enumerate(rows) if a is not None])
    return enc(batch), batch


def test_mixed_batch_equals_peft(setup):
    arch, bdir, bb, adapters = setup
    texts = TEXTS[: len(adapters)]
    rows = [(t, a[4]) for t, a in zip(texts, adapters)] + [(TEXTS[1], None)]  # last row: no adapter at all
    hidden, batch = run(bb, rows)
    plain_hidden, plain_batch = run(bb, [(t, None) for t, _ in rows])
    first = bb.encoder.first_tokens(hidden, batch)  # (B, 1, H)
    plain_first = bb.encoder.first_tokens(plain_hidden, plain_batch)
    cu = batch.cu_seqlens.tolist()
    assert len({cu[i + 1] - cu[i] for i in range(len(rows))}) > 3  # rows of different lengths
    # the adapter-free row is untouched by its neighbours' adapters
    assert torch.allclose(hidden[cu[-2] : cu[-1]], plain_hidden[cu[-2] : cu[-1]], atol=1e-6, rtol=0)
    for i, (name, folder, _config, c, _adapter, head) in enumerate(adapters):
        got = head(first[i : i + 1], bb.encoder.pooler)[0]  # (C,)
        want = peft_logits(bdir, str(folder), c, bb.tokenizer, [texts[i]])[0][0]
        assert got.shape == want.shape == (c,)
        assert (got - want).abs().max() <= TOL, (arch, name, (got - want).abs().max())
        without = head(plain_first[i : i + 1], bb.encoder.pooler)[0]  # same head, backbone alone
        assert (got - without).abs().max() > MOVES, (arch, name, "the adapter does not move the logits")


def test_body_round_trip_and_peft_folder(setup, tmp_path):
    """from_peft -> check/build -> body() -> to_peft gives PEFT's own tensors back, and PEFT loads the folder."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    arch, bdir, bb, adapters = setup
    for name, folder, config, c, adapter, _head in adapters:
        _, tensors = read_folder(folder)
        packed = from_peft(config, tensors)
        rebuilt = adapter.body() | {k: v for k, v in packed.items() if k.startswith("base_model.")}
        assert set(rebuilt) == set(packed)
        back = to_peft(config, rebuilt, arch)
        assert set(back) == set(tensors), name
        assert all(torch.equal(back[k], tensors[k]) for k in tensors), name
        out = tmp_path / name
        out.mkdir()
        (out / "adapter_config.json").write_text(json.dumps(config))
        save_file(back, str(out / "adapter_model.safetensors"))
        enc = bb.tokenizer(TEXTS[1], return_tensors="pt")
        if arch == "roberta":
            enc.pop("token_type_ids", None)
        logits = []
        for f in (folder, out):
            base = AutoModelForSequenceClassification.from_pretrained(bdir, num_labels=c)
            with torch.no_grad():
                logits.append(PeftModel.from_pretrained(base, str(f)).eval()(**enc).logits)
        assert torch.equal(logits[0], logits[1]), name


@pytest.mark.parametrize(
    "make",
    [
        lambda: lora.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "intermediate.dense"]),
        lambda: lora.LoraConfig(r=6, lora_alpha=3, use_rslora=True, target_modules=["key"], rank_pattern={"key": 2}),
        lambda: ia3.IA3Config(),
        lambda: ia3.IA3Config(target_modules=["query", "value", "intermediate.dense"], feedforward_modules=["query"]),
    ],
)
def test_init_as_peft_and_loadable(setup, make, tmp_path):
    """init() starts where PEFT starts (an identity update); once trained (perturbed), PEFT loads body + config
    through to_peft and computes what we compute."""

    arch, bdir, bb, adapters = setup
    cfg = make()
    kind = lora if isinstance(cfg, lora.LoraConfig) else ia3
    adapter = (kind.LoraAdapter if kind is lora else kind.IA3Adapter).init(cfg, bb.config)
    body = adapter.body()
    assert body and adapter.training and all(p.requires_grad for p in adapter.parameters())
    for k, v in body.items():
        if k.endswith("lora_B.weight"):
            assert not v.any()
        elif k.endswith("lora_A.weight"):
            assert v.abs().max() <= 1 / v.shape[1] ** 0.5 and v.std() > 0  # kaiming_uniform(a=sqrt 5) bound
        else:
            assert torch.equal(v, torch.ones_like(v))
    config = cfg.to_config_dict()
    assert kind.check(config, body).num_layers == bb.config.num_hidden_layers
    torch.manual_seed(7)
    trained = {k: v + 0.3 * torch.randn_like(v) for k, v in body.items()}
    ours = kind.build(config, trained)
    head = adapters[0][5]  # any head of this backbone's style
    hidden, batch = run(bb, [(TEXTS[3], ours)])
    got = head(bb.encoder.first_tokens(hidden, batch), bb.encoder.pooler)[0]
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    save_file(to_peft(config, trained | head.peft_state(), arch), str(tmp_path / "adapter_model.safetensors"))
    want = peft_logits(bdir, str(tmp_path), head.num_labels, bb.tokenizer, [TEXTS[3]])[0][0]
    assert (got - want).abs().max() <= TOL, (cfg, (got - want).abs().max())


def test_training_gradients(setup):
    """One backward through the frozen encoder reaches every adapter tensor (autograd through the hooks)."""
    arch, bdir, bb, adapters = setup
    enc = bb.encoder
    assert not any(p.requires_grad for p in enc.parameters())
    for name, _folder, _config, _c, adapter, _head in adapters:
        adapter.train().requires_grad_(True)
        try:
            encoded = [bb.tokenizer(t) for t in TEXTS[:2]]
            batch = enc.pack([e["input_ids"] for e in encoded])
            batch.hooks = SegmentHooks([(0, batch.num_tokens, adapter)])  # training: one segment, the whole stream
            enc(batch).square().mean().backward()
            for pname, p in adapter.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, (arch, name, pname)
        finally:
            adapter.zero_grad(set_to_none=True)
            adapter.eval().requires_grad_(False)


def test_half_precision_serving(setup):
    """fp32 adapter tensors on a bf16 encoder (as_float casts): close to the fp32 result."""
    arch, bdir, bb, adapters = setup
    bf = load_backbone(bdir, device="cpu", dtype="bfloat16")
    rows = [(t, a[4]) for t, a in zip(TEXTS, adapters)]
    ref, batch = run(bb, rows)
    got, _ = run(bf, rows)
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.1 * ref.abs().max()
    assert batch.num_tokens == got.shape[0]


def _peft_resolution(bdir: str, peft_type: str, kwargs: dict) -> tuple[dict, dict[str, Any]]:
    """(PEFT's saved adapter_config, {module name: (r, scaling) | is_feedforward}) of a real PeftModel."""
    from peft import IA3Config, LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, logging

    logging.set_verbosity_error()
    base = AutoModelForSequenceClassification.from_pretrained(bdir, num_labels=2)
    model = get_peft_model(base, (LoraConfig if peft_type == "LORA" else IA3Config)(task_type="SEQ_CLS", **kwargs))
    config = model.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    config = json.loads(json.dumps(config, default=str))  # as adapter_config.json holds it
    found: dict[str, Any] = {}
    for name, module in model.base_model.model.named_modules():
        if peft_type == "LORA" and "default" in getattr(module, "r", {}):
            found[name] = (module.r["default"], module.scaling["default"])
        elif peft_type == "IA3" and "default" in getattr(module, "ia3_l", {}):
            found[name] = module.is_feedforward
    return config, found


RESOLUTION_CASES: list[tuple[str, dict[str, Any]]] = [
    ("LORA", {"target_modules": ["dense"]}),  # roberta: classifier.dense is saved whole; bert: pooler.dense
    ("LORA", {"target_modules": "all-linear"}),
    ("LORA", {"target_modules": ["query", "output.dense"], "layers_to_transform": 1, "layers_pattern": "layer"}),
    ("LORA", {"target_modules": ["key", "query"], "exclude_modules": ["attention.self.key"]}),
    ("LORA", {"target_modules": ["encoder.layer.1.attention.self.value", "intermediate.dense"], "r": 2}),
    (
        "LORA",
        {
            "target_modules": r".*layer\.\d+\.(attention\.self\.(query|value)|output\.dense)",
            "rank_pattern": {r"layer\.0\..*": 5, "value": 3},
            "alpha_pattern": {"^(bert|roberta).encoder.layer.1.attention.self.query": 7},
            "use_rslora": True,
        },
    ),
    ("IA3", {}),
    ("IA3", {"target_modules": r".*\.(key|intermediate\.dense)", "feedforward_modules": ["termediate.dense"]}),
    ("IA3", {"target_modules": ["query", "dense"], "feedforward_modules": r".*attention.*"}),
]


@pytest.mark.parametrize("peft_type,kwargs", RESOLUTION_CASES)
def test_resolution_matches_peft(setup, peft_type, kwargs):
    """Our reading of target_modules & co. names the modules a real PeftModel adapts, with its ranks, scales and
    feed-forward flags; anything outside the six encoder modules is reported (we refuse it)."""
    arch, bdir, bb, _ = setup
    config, found = _peft_resolution(bdir, peft_type, kwargs)
    layers = bb.config.num_hidden_layers
    mine: dict[str, Any]
    if peft_type == "LORA":
        ours, others = lora.config.scales(config, arch, layers)
        mine = {f"{arch}.encoder.layer.{i}.{m}": (r, s) for (i, m), (r, s) in ours.items()}
    else:
        flags, others = ia3.config.resolve(config, arch, layers)
        mine = {f"{arch}.encoder.layer.{i}.{m}": ff for (i, m), ff in flags.items()}
    assert mine == {k: v for k, v in found.items() if ".encoder.layer." in k}
    assert sorted(others) == sorted(k for k in found if ".encoder.layer." not in k)
    assert mine, "every case targets some encoder module"
