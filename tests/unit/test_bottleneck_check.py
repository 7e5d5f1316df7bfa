"""Every error code of ``bottleneck.check``, each with one bad input (and the good input passes)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from prefixserve.adapters import bottleneck
from prefixserve.adapters.bottleneck import BottleneckConfig
from prefixserve.adapters.errors import InvalidAdapterError
from prefixserve.adapters.rowkinds import BodyShape

H = 32


def good_config(**changes: Any) -> dict:
    return BottleneckConfig.houlsby(reduction_factor=8).to_config_dict() | changes


def good_body(layers: int = 2, down: int = H // 8, blocks=("attention.output", "output")) -> dict[str, torch.Tensor]:
    body: dict[str, torch.Tensor] = {}
    for i in range(layers):
        for b in blocks:
            p = f"encoder.layer.{i}.{b}."
            body |= {
                p + "adapter_down.weight": torch.zeros(down, H),
                p + "adapter_down.bias": torch.zeros(down),
                p + "adapter_up.weight": torch.zeros(H, down),
                p + "adapter_up.bias": torch.zeros(H),
            }
    return body


def test_good_input_passes():
    assert bottleneck.check(good_config(), good_body()) == BodyShape(num_layers=2, hidden=H)
    pf = BottleneckConfig.pfeiffer(reduction_factor={"1": 4, "default": 8}).to_config_dict()
    body = good_body(1, 4, ("output",)) | {
        k.replace("layer.0", "layer.1"): v for k, v in good_body(1, 8, ("output",)).items()
    }
    assert bottleneck.check(pf, body).num_layers == 2
    assert bottleneck.PEFT_TYPE == "BOTTLENECK" and bottleneck.KIND == "bottleneck"


def _without(key: str) -> dict:
    config = good_config()
    del config[key]
    return config


BAD_CONFIGS: dict[str, list[Any]] = {
    "bad_config": [
        "not a dict",
        _without("mh_adapter"),
        _without("reduction_factor"),
        good_config(output_adapter="yes"),
        good_config(original_ln_after=1),
        good_config(mh_adapter=False, output_adapter=False),
        good_config(reduction_factor=0),
        good_config(reduction_factor=True),
        good_config(reduction_factor={"x": 8}),
        good_config(reduction_factor={"0": -1, "default": 8}),
        good_config(reduction_factor={"0": 8}),  # layer 1 has an adapter, no entry and no default
        good_config(non_linearity=3),
        good_config(scaling="big"),
        good_config(scaling=float("inf")),
        good_config(residual_before_ln="pre_add"),
        good_config(residual_before_ln=1),
        good_config(residual_before_ln="post_add"),  # needs original_ln_before (houlsby has it false)
        good_config(leave_out="1"),
        good_config(leave_out=[-1]),
        good_config(init_weights="xavier"),
        good_config(init_weights_seed="7"),
    ],
    "unsupported_config": [
        good_config(architecture="lora"),
        good_config(ln_before=True),
        good_config(ln_after=True),
        good_config(use_gating=True),
        good_config(is_parallel=True),
        good_config(phm_layer=True),
        good_config(inv_adapter="nice"),
        good_config(scaling="learned"),
        good_config(scaling="channel"),
        good_config(non_linearity="mish"),
    ],
}


@pytest.mark.parametrize(
    ("code", "config"), [(code, c) for code, configs in BAD_CONFIGS.items() for c in configs], ids=repr
)
def test_config_errors(code, config):
    with pytest.raises(InvalidAdapterError) as e:
        bottleneck.check(config, good_body())
    assert e.value.code == code, e.value.message
    assert len(e.value.message) < 300


def _drop(body: dict, key: str) -> dict:
    return {k: v for k, v in body.items() if k != key}


BAD_BODIES = {
    "bad_tensors": [
        {},
        good_body() | {"encoder.layer.0.output.adapter_mid.weight": torch.zeros(1)},
        good_body() | {"base_model.encoder.layer.0.output.adapter_up.bias": torch.zeros(H)},
        good_body() | {"encoder.layer.00.output.adapter_up.bias": torch.zeros(H)},
        _drop(good_body(), "encoder.layer.0.output.adapter_up.bias"),
        _drop(good_body(), "encoder.layer.1.attention.output.adapter_down.weight"),
        good_body(blocks=("output",)),  # houlsby: the attention block is missing
        good_body(layers=3) | {"x" * 10_000: torch.zeros(1)},  # huge names are truncated in the message
    ],
    "shape_mismatch": [
        good_body(down=H // 4),  # reduction_factor 8 -> down 4, not 8
        good_body() | {"encoder.layer.0.output.adapter_up.bias": torch.zeros(H + 1)},
        good_body() | {"encoder.layer.1.output.adapter_down.weight": torch.zeros(H // 8, H + 1)},
        good_body() | {"encoder.layer.0.attention.output.adapter_up.weight": torch.zeros(H * H // 8)},
    ],
}


@pytest.mark.parametrize(("code", "body"), [(c, b) for c, bodies in BAD_BODIES.items() for b in bodies])
def test_tensor_errors(code, body):
    with pytest.raises(InvalidAdapterError) as e:
        bottleneck.check(good_config(), body)
    assert e.value.code == code, e.value.message
    assert len(e.value.message) < 300


def test_leave_out_layer_with_tensors_is_refused():
    with pytest.raises(InvalidAdapterError) as e:
        bottleneck.check(good_config(leave_out=[1]), good_body())
    assert e.value.code == "bad_tensors"
    assert bottleneck.check(good_config(leave_out=[1]), good_body(layers=1)).num_layers == 1


def test_reduction_below_one_and_clamp():
    """rf < 1 is an up-projection (AdapterHub allows it); int(H // rf) < 1 is clamped to 1."""
    assert bottleneck.check(good_config(reduction_factor=0.5), good_body(down=2 * H)).hidden == H
    assert bottleneck.check(good_config(reduction_factor=64), good_body(down=1)).hidden == H
