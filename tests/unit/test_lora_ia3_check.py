"""Every error code of the LoRA and IA3 ``check()`` (and of the PEFT folder renames), one bad input each.

Tensors are built by hand (hidden 8, FFN 16, 2 layers): no backbone, no PEFT.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from transformers import BertConfig, RobertaConfig

from prefixserve.adapters import ia3, lora
from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.adapters.peft_weights import MAX_LAYERS, from_peft, to_peft
from prefixserve.adapters.rowkinds import MODULES, BodyShape

H, I, L = 8, 16, 2  # noqa: E741 (I: the FFN width, as everywhere here)
Body = dict[str, torch.Tensor]
LORA = {"peft_type": "LORA", "task_type": "SEQ_CLS", "r": 2, "lora_alpha": 4, "target_modules": ["query", "value"]}
IA3 = {
    "peft_type": "IA3",
    "task_type": "SEQ_CLS",
    "target_modules": ["key", "value", "output.dense"],
    "feedforward_modules": ["output.dense"],
}


def lora_body(r: int = 2, modules: tuple[str, ...] = ("attention.self.query", "attention.self.value")) -> Body:
    body: Body = {}
    for i in range(L):
        for m in modules:
            fan_in = I if m == "output.dense" else H
            fan_out = I if m == "intermediate.dense" else H
            body[f"encoder.layer.{i}.{m}.lora_A.weight"] = torch.randn(r, fan_in)
            body[f"encoder.layer.{i}.{m}.lora_B.weight"] = torch.randn(fan_out, r)
    return body


def ia3_body() -> Body:
    body: Body = {}
    for i in range(L):
        p = f"encoder.layer.{i}."
        body |= {p + "attention.self.key.ia3_l": torch.rand(H, 1), p + "attention.self.value.ia3_l": torch.rand(H, 1)}
        # "output.dense" is feed-forward and, by PEFT's plain suffix match, so is attention.output.dense
        body |= {p + "attention.output.dense.ia3_l": torch.rand(1, H), p + "output.dense.ia3_l": torch.rand(1, I)}
    return body


def edit(body: Body, put: Body | None = None, drop: tuple[str, ...] = ()) -> Body:
    """``body`` without ``drop``, with ``put``."""
    return {k: v for k, v in body.items() if k not in drop} | (put or {})


Q0 = "encoder.layer.0.attention.self.query"
K0 = "encoder.layer.0.attention.self.key"


def test_valid_shapes_and_build_round_trip():
    assert lora.check(LORA, lora_body()) == BodyShape(L, H, 0)
    assert ia3.check(IA3, ia3_body()) == BodyShape(L, H, I)
    for kind, config, body in ((lora, LORA, lora_body()), (ia3, IA3, ia3_body())):
        built = kind.build(config, body)
        assert not built.training  # no dropout when served
        back = built.body()
        assert set(back) == set(body) and all(torch.equal(back[k], body[k]) for k in body)
    six = tuple(MODULES)
    assert lora.check(LORA | {"target_modules": list(six)}, lora_body(modules=six)) == BodyShape(L, H, I)


# (case, kind, config, body, code)
CASES: list[tuple[str, Any, dict[str, Any], Callable[[], Body], str]] = [
    # ---- LoRA: config
    ("lora not an object", lora, [], lora_body, "bad_config"),  # type: ignore[list-item]
    ("lora wrong peft_type", lora, LORA | {"peft_type": "IA3"}, lora_body, "bad_config"),
    ("lora r=0", lora, LORA | {"r": 0}, lora_body, "bad_config"),
    ("lora r string", lora, LORA | {"r": "2"}, lora_body, "bad_config"),
    ("lora alpha string", lora, LORA | {"lora_alpha": "x"}, lora_body, "bad_config"),
    ("lora alpha huge", lora, LORA | {"lora_alpha": 10**400}, lora_body, "bad_config"),
    ("lora dropout 1.5", lora, LORA | {"lora_dropout": 1.5}, lora_body, "bad_config"),
    ("lora rslora string", lora, LORA | {"use_rslora": "yes"}, lora_body, "bad_config"),
    ("lora no targets", lora, LORA | {"target_modules": None}, lora_body, "bad_config"),
    ("lora target not str", lora, LORA | {"target_modules": [1]}, lora_body, "bad_config"),
    ("lora target bad regex", lora, LORA | {"target_modules": "(query"}, lora_body, "bad_config"),
    ("lora rank_pattern bad regex", lora, LORA | {"rank_pattern": {"(?i)query": 2}}, lora_body, "bad_config"),
    ("lora rank_pattern not dict", lora, LORA | {"rank_pattern": [2]}, lora_body, "bad_config"),
    ("lora layers string", lora, LORA | {"layers_to_transform": "1"}, lora_body, "bad_config"),
    ("lora layers_pattern alone", lora, LORA | {"layers_pattern": "layer"}, lora_body, "bad_config"),
    (
        "lora layers_pattern group",
        lora,
        LORA | {"layers_pattern": "(?P<idx>x)", "layers_to_transform": [0]},
        lora_body,
        "bad_config",
    ),
    (
        "lora regex + layers",
        lora,
        LORA | {"target_modules": ".*query", "layers_to_transform": [0]},
        lora_body,
        "bad_config",
    ),
    ("lora modules_to_save str", lora, LORA | {"modules_to_save": "classifier"}, lora_body, "bad_config"),
    ("lora task", lora, LORA | {"task_type": "CAUSAL_LM"}, lora_body, "unsupported_config"),
    ("lora dora", lora, LORA | {"use_dora": True}, lora_body, "unsupported_config"),
    ("lora bias", lora, LORA | {"bias": "all"}, lora_body, "unsupported_config"),
    ("lora fan_in_fan_out", lora, LORA | {"fan_in_fan_out": True}, lora_body, "unsupported_config"),
    ("lora lora_bias", lora, LORA | {"lora_bias": True}, lora_body, "unsupported_config"),
    ("lora trainable tokens", lora, LORA | {"trainable_token_indices": [1, 2]}, lora_body, "unsupported_config"),
    ("lora pissa", lora, LORA | {"init_lora_weights": "pissa"}, lora_body, "unsupported_config"),
    ("lora save embeddings", lora, LORA | {"modules_to_save": ["embeddings"]}, lora_body, "unsupported_config"),
    ("lora unknown field", lora, LORA | {"lora_new_trick": 1}, lora_body, "unsupported_config"),
    (
        "lora alpha by backbone",  # fits BERT and RoBERTa names alike, but scales layer 0's query only on BERT
        lora,
        LORA | {"alpha_pattern": {"^bert.encoder.layer.0.attention.self.query": 3}},
        lora_body,
        "unsupported_config",
    ),
    (
        "lora embeddings",
        lora,
        LORA | {"target_modules": ["query", "value", "word_embeddings"]},
        lora_body,
        "unsupported_target",
    ),
    (
        "lora layer norm",
        lora,
        LORA | {"target_modules": "encoder.*(query|value|LayerNorm)"},
        lora_body,
        "unsupported_target",
    ),
    ("lora no match", lora, LORA | {"target_modules": ["q_proj"]}, lora_body, "unsupported_target"),
    ("lora r=65", lora, LORA | {"r": 65}, lora_body, "rank_too_large"),
    ("lora rank_pattern 100", lora, LORA | {"rank_pattern": {"value": 100}}, lora_body, "rank_too_large"),
    # ---- LoRA: tensors
    ("lora rank != r", lora, LORA, lambda: lora_body(r=3), "shape_mismatch"),
    (
        "lora A rank != B rank",
        lora,
        LORA,
        lambda: edit(lora_body(), {Q0 + ".lora_B.weight": torch.randn(H, 3)}),
        "shape_mismatch",
    ),
    ("lora 1-D", lora, LORA, lambda: edit(lora_body(), {Q0 + ".lora_A.weight": torch.randn(2)}), "shape_mismatch"),
    (
        "lora widths",
        lora,
        LORA,
        lambda: edit(lora_body(), {Q0 + ".lora_A.weight": torch.randn(2, 6)}),
        "shape_mismatch",
    ),
    (
        "lora tensor rank 65",
        lora,
        LORA,
        lambda: edit(lora_body(), {Q0 + ".lora_A.weight": torch.randn(65, H)}),
        "shape_mismatch",
    ),
    ("lora empty body", lora, LORA, dict, "bad_tensors"),
    (
        "lora unknown name",
        lora,
        LORA,
        lambda: edit(lora_body(), {Q0 + ".lora_C.weight": torch.randn(2, H)}),
        "bad_tensors",
    ),
    ("lora missing B", lora, LORA, lambda: edit(lora_body(), drop=(Q0 + ".lora_B.weight",)), "bad_tensors"),
    (
        "lora missing module",
        lora,
        LORA,
        lambda: edit(lora_body(), drop=(Q0 + ".lora_A.weight", Q0 + ".lora_B.weight")),
        "bad_tensors",
    ),
    (
        "lora untargeted module",
        lora,
        LORA,
        lambda: lora_body(modules=("attention.self.query", "attention.self.value", "attention.self.key")),
        "bad_tensors",
    ),
    (
        "lora leading zero",
        lora,
        LORA,
        lambda: edit(lora_body(), {"encoder.layer.01.attention.self.query.lora_A.weight": torch.randn(2, H)}),
        "bad_tensors",
    ),
    (
        "lora layer too deep",
        lora,
        LORA,
        lambda: edit(
            lora_body(), {f"encoder.layer.{MAX_LAYERS}.attention.self.query.lora_A.weight": torch.randn(2, H)}
        ),
        "bad_tensors",
    ),
    ("lora ia3 tensor", lora, LORA, lambda: edit(lora_body(), {Q0 + ".ia3_l": torch.rand(H, 1)}), "bad_tensors"),
    # ---- IA3: config
    ("ia3 not an object", ia3, None, ia3_body, "bad_config"),  # type: ignore[list-item]
    ("ia3 wrong peft_type", ia3, IA3 | {"peft_type": "LORA"}, ia3_body, "bad_config"),
    ("ia3 ff not subset", ia3, IA3 | {"feedforward_modules": ["query"]}, ia3_body, "bad_config"),
    ("ia3 no ff", ia3, IA3 | {"feedforward_modules": None}, ia3_body, "bad_config"),
    ("ia3 init string", ia3, IA3 | {"init_ia3_weights": "yes"}, ia3_body, "bad_config"),
    ("ia3 ff bad regex", ia3, IA3 | {"target_modules": ".*", "feedforward_modules": "("}, ia3_body, "bad_config"),
    ("ia3 task", ia3, IA3 | {"task_type": "TOKEN_CLS"}, ia3_body, "unsupported_config"),
    ("ia3 fan_in_fan_out", ia3, IA3 | {"fan_in_fan_out": True}, ia3_body, "unsupported_config"),
    ("ia3 unknown field", ia3, IA3 | {"layers_to_transform": [0]}, ia3_body, "unsupported_config"),
    (
        "ia3 layer norm",
        ia3,
        IA3 | {"target_modules": [*IA3["target_modules"], "LayerNorm"]},
        ia3_body,
        "unsupported_target",
    ),
    (
        "ia3 no match",
        ia3,
        IA3 | {"target_modules": ["k_proj"], "feedforward_modules": []},
        ia3_body,
        "unsupported_target",
    ),
    # ---- IA3: tensors
    ("ia3 orientation", ia3, IA3, lambda: edit(ia3_body(), {K0 + ".ia3_l": torch.rand(1, H)}), "shape_mismatch"),
    ("ia3 2 columns", ia3, IA3, lambda: edit(ia3_body(), {K0 + ".ia3_l": torch.rand(H, 2)}), "shape_mismatch"),
    ("ia3 widths", ia3, IA3, lambda: edit(ia3_body(), {K0 + ".ia3_l": torch.rand(6, 1)}), "shape_mismatch"),
    ("ia3 empty body", ia3, IA3, dict, "bad_tensors"),
    ("ia3 missing", ia3, IA3, lambda: edit(ia3_body(), drop=(K0 + ".ia3_l",)), "bad_tensors"),
    (
        "ia3 lora tensor",
        ia3,
        IA3,
        lambda: edit(ia3_body(), {K0 + ".lora_A.weight": torch.rand(2, H)}),
        "bad_tensors",
    ),
]


@pytest.mark.parametrize("case,kind,config,body,code", CASES, ids=[c[0] for c in CASES])
def test_check_error_codes(case, kind, config, body, code):
    with pytest.raises(InvalidAdapterError) as info:
        kind.check(config, body())
    assert info.value.code == code, (case, info.value.code, info.value.message)
    assert len(info.value.message) < 250


def test_every_code_is_covered():
    codes = {
        "bad_config",
        "unsupported_config",
        "unsupported_target",
        "shape_mismatch",
        "rank_too_large",
        "bad_tensors",
    }
    assert {c[4] for c in CASES if c[1] is lora} == codes
    assert {c[4] for c in CASES if c[1] is ia3} == codes - {"rank_too_large"}  # IA3 has no rank


def test_long_client_strings_are_truncated():
    config = LORA | {"target_modules": ["query", "value", "x" * 400 + ".LayerNorm"]}
    with pytest.raises(InvalidAdapterError) as info:  # matches nothing extra: fine, but the name is not echoed
        lora.check(config | {"lora_new_trick": "y" * 10_000, "z" * 500: 1}, lora_body())
    assert info.value.code == "unsupported_config" and len(info.value.message) < 200


def test_peft_names():
    head = {"base_model.model.classifier.weight": torch.zeros(2, H), "base_model.model.classifier.bias": torch.zeros(2)}
    pooler = {"base_model.model.bert.pooler.dense.weight": torch.zeros(H, H)}
    body = {f"base_model.model.bert.{k}": v for k, v in lora_body().items()}
    packed = from_peft(LORA, body | head | pooler)
    assert set(packed) == set(lora_body()) | {
        "base_model.classifier.weight",
        "base_model.classifier.bias",
        "base_model.bert.pooler.dense.weight",
    }
    assert set(to_peft(LORA, packed, "bert")) == set(body | head | pooler)
    bad: list[tuple[dict, dict, str]] = [
        ({"peft_type": "PREFIX_TUNING"}, body, "bad_config"),
        (
            LORA,
            {"base_model.model.bert.embeddings.word_embeddings.lora_embedding_A": torch.zeros(2, 4)},
            "unsupported_target",
        ),
        (LORA, {"base_model.model.bert.pooler.dense.lora_A.weight": torch.zeros(2, H)}, "unsupported_target"),
        (
            LORA,
            {"base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.default.weight": torch.zeros(2, H)},
            "unsupported_target",
        ),
        (LORA, {"base_model.model.roberta.pooler.dense.weight": torch.zeros(H, H)}, "bad_tensors"),
        (LORA, {"something.else": torch.zeros(1)}, "bad_tensors"),
        (LORA, body | {k.replace(".bert.", ".roberta."): v for k, v in body.items()}, "bad_tensors"),
        (IA3, body, "unsupported_target"),  # LoRA tensors in an IA3 folder
    ]
    for config, tensors, code in bad:
        with pytest.raises(InvalidAdapterError) as info:
            from_peft(config, tensors)
        assert info.value.code == code, (sorted(tensors)[0], info.value.message)
    with pytest.raises(InvalidAdapterError) as info:
        to_peft(LORA, packed, "roberta")  # a pooler has no place in a roberta folder
    assert info.value.code == "bad_tensors"


def _backbone_config(cls: type, **kw: Any) -> Any:
    return cls(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=2, vocab_size=10, **kw)


def test_init_resolves_for_the_backbone():
    """init() reads target_modules for the backbone's own module names, as get_peft_model would."""
    bert, roberta = _backbone_config(BertConfig), _backbone_config(RobertaConfig)
    cfg = lora.LoraConfig(r=2, target_modules=["dense"])  # RoBERTa: its classifier.dense is saved whole
    adapter = lora.LoraAdapter.init(cfg, roberta)
    assert len(adapter.body()) == 2 * 3 * L  # attention.output.dense, intermediate.dense, output.dense
    with pytest.raises(InvalidAdapterError) as info:
        lora.LoraAdapter.init(cfg, bert)  # BERT: pooler.dense too, which we cannot serve
    assert info.value.code == "unsupported_target"
    with pytest.raises(InvalidAdapterError) as info:
        lora.LoraAdapter.init(lora.LoraConfig(r=80), bert)
    assert info.value.code == "rank_too_large"
    ia3_adapter = ia3.IA3Adapter.init(ia3.IA3Config(init_ia3_weights=False), bert)
    shapes = {k: tuple(v.shape) for k, v in ia3_adapter.body().items()}
    assert shapes["encoder.layer.0.attention.output.dense.ia3_l"] == (1, H)  # feed-forward by suffix, as PEFT
    assert shapes["encoder.layer.1.output.dense.ia3_l"] == (1, I)
    assert shapes["encoder.layer.1.attention.self.key.ia3_l"] == (H, 1)
    assert ia3.check(ia3.IA3Config().to_config_dict(), ia3_adapter.body()) == BodyShape(L, H, I)
