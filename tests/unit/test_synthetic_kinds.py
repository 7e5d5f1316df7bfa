"""``synthetic.random_adapter`` for every kind: valid packed files, seeded, defaults, and not the identity."""

from __future__ import annotations

import pytest
import torch

from prefixserve.adapters.backbone import load_backbone
from prefixserve.adapters.format import VIRTUAL_KEY, load_packed
from prefixserve.adapters.rowkinds import SegmentHooks
from prefixserve.adapters.synthetic import random_adapter

WEIGHT = ("lora", "ia3", "bottleneck")


@pytest.fixture(scope="module")
def backbones(tiny_backbones, one_thread):
    return {arch: load_backbone(d, device="cpu", dtype="float32") for arch, d in tiny_backbones.items()}


@pytest.mark.parametrize("arch", ["roberta", "bert"])
@pytest.mark.parametrize("kind", WEIGHT)
def test_weight_kinds_are_valid_seeded_and_leave_the_global_rng(backbones, arch, kind):
    bb = backbones[arch]
    state = torch.random.get_rng_state()
    data = random_adapter(bb.config, bb.fingerprint, kind=kind, seed=7)
    assert torch.equal(state, torch.random.get_rng_state())
    assert data == random_adapter(bb.config, bb.fingerprint, kind=kind, seed=7)
    assert data != random_adapter(bb.config, bb.fingerprint, kind=kind, seed=8)
    f = load_packed(data, expect=bb.spec)
    assert (f.meta.kind, f.meta.num_virtual_tokens, f.meta.labels) == (kind, 0, ("negative", "positive"))


def test_weight_defaults_and_non_trivial_bodies(backbones):
    bb = backbones["roberta"]
    h, layers = bb.config.hidden_size, bb.config.num_hidden_layers
    lora = load_packed(random_adapter(bb.config, bb.fingerprint, kind="lora"))
    assert (lora.peft_config["r"], lora.peft_config["target_modules"]) == (8, ["query", "value"])
    assert len(lora.body) == layers * 2 * 2  # query and value: lora_A and lora_B each
    assert all(t.abs().max() > 0.01 for k, t in lora.body.items() if "lora_B" in k)  # PEFT's init is zeros
    ia3 = load_packed(random_adapter(bb.config, bb.fingerprint, kind="ia3"))
    assert ia3.peft_config["target_modules"] == ["key", "value", "output.dense"]
    assert all((t - 1).abs().max() > 0.05 for t in ia3.body.values())  # PEFT's init is ones
    bn = load_packed(random_adapter(bb.config, bb.fingerprint, kind="bottleneck"))
    cfg = bn.peft_config
    assert (cfg["reduction_factor"], cfg["mh_adapter"], cfg["output_adapter"], cfg["original_ln_before"]) == (
        16,
        False,
        True,
        True,
    )
    ups = [t for k, t in bn.body.items() if k.endswith("adapter_up.weight")]
    assert len(ups) == layers and all(t.shape == (h, max(1, h // 16)) and t.std() > 0.05 for t in ups)


@pytest.mark.parametrize("kind", WEIGHT)
def test_each_weight_kind_moves_the_encoder_output(backbones, kind):
    from prefixserve.adapters.engine import Engine

    bb = backbones["roberta"]
    module = Engine(bb).to_device(kind, random_adapter(bb.config, bb.fingerprint, kind=kind, seed=1)).weights
    assert module is not None
    ids = bb.tokenizer(["the movie was really good"])["input_ids"]
    with torch.inference_mode():
        plain = bb.encoder(bb.encoder.pack(ids))  # (T, H)
        batch = bb.encoder.pack(ids)
        batch.hooks = SegmentHooks([(0, len(ids[0]), module)])
        adapted = bb.encoder(batch)  # (T, H)
    # A random backbone's sublayers add ~1 % to the residual stream (0.02-std weights), so an adapter inside
    # attention (LoRA, IA3) moves the hidden states by ~0.5-1 %; an identity adapter by 0 (fp32: ~1e-7).
    change = (adapted - plain).norm() / plain.norm()
    assert change > 2e-3, f"{kind} barely changes the hidden states ({change:.2e})"


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_virtual_kinds_keep_their_draw(backbones, kind):
    """Prefix / prompt bytes are what they were before weight kinds: N(0, 0.25) virtual tokens drawn first."""
    bb = backbones["bert"]
    f = load_packed(random_adapter(bb.config, bb.fingerprint, kind=kind, num_virtual_tokens=5, seed=3))
    width = f.virtual.shape[1]
    want = torch.randn(5, width, generator=torch.Generator().manual_seed(3)) * 0.5
    assert torch.equal(f.tensors[VIRTUAL_KEY], want)


def test_unknown_kind(backbones):
    bb = backbones["bert"]
    with pytest.raises(ValueError, match="kind must be one of"):
        random_adapter(bb.config, bb.fingerprint, kind="adalora")
