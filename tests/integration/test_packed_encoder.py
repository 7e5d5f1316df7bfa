"""Our packed encoder equals transformers' own forward, row by row, on ragged batches (fp32, 1e-5).

Each row is checked against transformers run on that row ALONE (no padding, so no mask effects): plain rows of
every length 1..max, rows with a prefix (through a ``DynamicCache``, as PEFT feeds it) or a prompt (as input
embeddings before the tokens, as PEFT places it), sentence pairs, and rows that fill every position the
adapter leaves. All rows share one packed batch, under every attention plan (equal-length groups only,
the default, one padded group).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, DynamicCache

from prefixserve.adapters.encoder import PackedEncoder
from prefixserve.adapters.packing import DEFAULT_SLACK, pack, plan_groups
from prefixserve.adapters.rowkinds import LINEAR_POINTS, NORM_POINTS, PassThrough, SegmentHooks

TOL = 1e-5
SLACKS = [0.0, None, 1e9]  # None: packing.DEFAULT_SLACK


@pytest.fixture(scope="module", params=["bert", "roberta", "xlm-roberta"])
def models(request, tiny_backbones, tiny_xlmr):
    path = tiny_xlmr if request.param == "xlm-roberta" else tiny_backbones[request.param]
    hf = AutoModel.from_pretrained(path).eval()
    assert (
        type(hf).__name__
        == {"bert": "BertModel", "roberta": "RobertaModel", "xlm-roberta": "XLMRobertaModel"}[request.param]
    )
    return hf, PackedEncoder.from_hf(hf).eval()


def _reference(hf, ids: list[int], types: list[int], prompt=None, prefix=None) -> torch.Tensor:
    """transformers on one row: (Q + n, H)."""
    start = int(hf.config.pad_token_id) + 1 if hf.config.model_type != "bert" else 0
    p = 0 if prefix is None else prefix.shape[2]
    emb = hf.embeddings.word_embeddings(torch.tensor([ids]))  # (1, n, H)
    tt = torch.tensor([types])  # (1, n)
    if prompt is not None:
        emb = torch.cat([prompt.unsqueeze(0), emb], dim=1)  # (1, Q+n, H)
        tt = torch.cat([torch.zeros(1, prompt.shape[0], dtype=torch.long), tt], dim=1)
    s = emb.shape[1]
    cache = None
    if prefix is not None:  # (layers, 2, P, heads, hd) -> per layer (1, heads, P, hd)
        cache = DynamicCache()
        for layer in range(prefix.shape[0]):
            cache.update(prefix[layer, 0].transpose(0, 1)[None], prefix[layer, 1].transpose(0, 1)[None], layer)
    out = hf(
        inputs_embeds=emb,
        token_type_ids=tt,
        position_ids=torch.arange(start + p, start + p + s)[None],
        attention_mask=torch.ones(1, p + s, dtype=torch.long),
        past_key_values=cache,
        use_cache=False,
    )
    return out.last_hidden_state[0]


def _rows(hf, gen: torch.Generator):
    """Ragged rows: lengths 1..max, with and without prefixes / prompts, pairs, full-room rows."""
    c = hf.config
    layers, heads, hidden = c.num_hidden_layers, c.num_attention_heads, c.hidden_size
    start = int(c.pad_token_id) + 1 if c.model_type != "bert" else 0
    limit = c.max_position_embeddings - start
    two_types = c.type_vocab_size >= 2
    prefixes = {p: torch.randn(layers, 2, p, heads, hidden // heads, generator=gen) for p in (1, 5, 12)}
    prompts = {q: torch.randn(q, hidden, generator=gen) for q in (1, 4, 9)}
    rows: list[tuple[int, torch.Tensor | None, torch.Tensor | None, bool]] = []  # (n, prompt, prefix, pair)
    for n in [1, 2, 3, 5, 8, 13, 21, 34, limit]:  # plain rows, up to every position
        rows.append((n, None, None, False))
    for p, n in [(1, 7), (5, 1), (5, 30), (12, limit - 12), (5, 9)]:  # prefix rows, one filling its room
        rows.append((n, None, prefixes[p], False))
    for q, n in [(1, 3), (4, 16), (9, limit - 9)]:  # prompt rows, one filling its room
        rows.append((n, prompts[q], None, False))
    rows += [(11, None, None, True), (9, None, prefixes[5], True), (6, prompts[4], None, True)]  # pairs
    out = []
    for n, prompt, prefix, pair in rows:
        ids = torch.randint(5, c.vocab_size, (n,), generator=gen).tolist()
        types = [0] * n
        if pair and two_types:
            types = [0] * (n // 2) + [1] * (n - n // 2)
        out.append((ids, types, prompt, prefix))
    order = torch.randperm(len(out), generator=gen).tolist()  # arrival order: lengths and kinds interleaved
    return [out[i] for i in order]


def test_packed_rows_equal_transformers_alone(models):
    hf, enc = models
    rows = _rows(hf, torch.Generator().manual_seed(0))
    two_types = hf.config.type_vocab_size >= 2
    with torch.no_grad():
        refs = [_reference(hf, ids, types if two_types else [0] * len(ids), q, p) for ids, types, q, p in rows]
        for slack in SLACKS:
            batch = pack(
                [r[0] for r in rows],
                [r[1] for r in rows] if two_types else None,
                prompts=[r[2] for r in rows],
                prefixes=[r[3] for r in rows],
                position_start=enc.position_start,
                slack=DEFAULT_SLACK if slack is None else slack,
            )
            hidden = enc(batch)  # (T, H)
            assert hidden.shape[0] == sum(len(r[0]) + (0 if r[2] is None else r[2].shape[0]) for r in rows)
            for i, ref in enumerate(refs):
                mine = hidden[int(batch.cu_seqlens[i]) : int(batch.cu_seqlens[i + 1])]
                assert mine.shape == ref.shape
                assert (mine - ref).abs().max() <= TOL, (i, len(rows[i][0]), slack)


def test_a_row_longer_than_the_position_table_is_refused_by_the_embedding(models):
    """The engine truncates to ``text_room``; the encoder itself has no silent clamp: an overlong row fails."""
    hf, enc = models
    room = enc.max_text_tokens(3)
    prefix = torch.zeros(hf.config.num_hidden_layers, 2, 3, hf.config.num_attention_heads, 8)
    with pytest.raises(IndexError):
        enc(enc.pack([[5] * (room + 1)], prefixes=[prefix]))


def test_rows_sharing_an_adapter_store_it_once(models):
    hf, enc = models
    prefix = torch.randn(hf.config.num_hidden_layers, 2, 4, hf.config.num_attention_heads, 8)
    other = torch.randn_like(prefix)
    batch = enc.pack([[5, 6], [7], [8, 9, 10]], prefixes=[prefix, prefix, other])
    assert batch.prefix_pool is not None and batch.prefix_pool.shape[2] == 8  # two distinct prefixes, not three
    assert batch.max_k == 4 + 3 and batch.num_tokens == 6


class _Recorder(PassThrough):
    """Identity at every point of every layer, recording the calls and the segment sizes."""

    def __init__(self, layers: int, shift_at: tuple[int, str] | None = None):
        self.points = frozenset((i, p) for i in range(layers) for p in (*LINEAR_POINTS, *NORM_POINTS))
        self.seen: list[tuple[int, str, int]] = []
        self.shift_at = shift_at

    def before(self, layer, point, x):
        self.seen.append((layer, point + ".in", x.shape[0]))
        return x

    def after(self, layer, point, x, y, linear):
        self.seen.append((layer, point, x.shape[0]))
        if (layer, point) == self.shift_at:
            return y + torch.linspace(0, 1, y.shape[-1])  # LayerNorm would remove a constant
        return y

    def norm(self, layer, point, x, h, y, ln):
        self.seen.append((layer, point, x.shape[0]))
        return y


def test_hooks_act_on_their_segment_only(models):
    """A weight adapter sees only its own rows at every named point; an identity changes nothing, a delta moves
    its own rows and leaves the other rows bit-identical."""
    hf, enc = models
    ids = [[5, 6, 7], [8], [9, 10]]
    with torch.no_grad():
        base = enc(enc.pack(ids))
        batch = enc.pack(ids)
        rec = _Recorder(len(enc.layers))
        batch.hooks = SegmentHooks([(3, 4, rec)])  # row 1 only
        assert torch.equal(enc(batch), base)
        want = {(i, p) for i in range(len(enc.layers)) for p in ("qkv", "attn_out", "ffn_in", "ffn_out")}
        assert {(layer, p) for layer, p, _ in rec.seen} == {(layer, p + ".in") for layer, p in want} | want | {
            (i, p) for i in range(len(enc.layers)) for p in NORM_POINTS
        }
        assert {n for *_, n in rec.seen} == {1}
        moved = enc.pack(ids)
        moved.hooks = SegmentHooks([(0, 3, _Recorder(len(enc.layers), shift_at=(0, "ffn_out")))])  # row 0 only
        out = enc(moved)
        assert (out[:3] - base[:3]).abs().max() > 1e-3
        assert torch.equal(out[3:], base[3:])


def test_gradients_flow_to_virtual_tokens(models):
    """The trainer trains through this encoder: a prefix and a prompt both get gradients."""
    hf, enc = models
    c = hf.config
    prefix = torch.randn(c.num_hidden_layers, 2, 3, c.num_attention_heads, 8, requires_grad=True)
    prompt = torch.randn(2, c.hidden_size, requires_grad=True)
    hidden = enc(enc.pack([[5, 6], [7, 8, 9]], prompts=[None, prompt], prefixes=[prefix, None]))
    (
        hidden * torch.randn(hidden.shape, generator=torch.Generator().manual_seed(0))
    ).sum().backward()  # LN: a plain sum is flat
    assert prefix.grad is not None and prefix.grad.abs().sum() > 0
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0


def test_plan_groups_pads_only_within_slack():
    k = [3, 3, 4, 10, 11, 40]
    assert plan_groups(k, k, 0.0) == [[0, 1], [2], [3], [4], [5]]  # equal lengths only
    assert plan_groups(k, k, 1e9) == [[0, 1, 2, 3, 4, 5]]  # one padded batch
    for group in plan_groups(k, k, 0.25):
        real = sum(k[i] for i in group)
        assert len(group) * max(k[i] for i in group) <= 1.25 * real


def test_the_varlen_layout_gives_each_row_its_own_keys(models, monkeypatch):
    """The CUDA path's inputs (key stream, offsets), checked on CPU: varlen attention emulated row by row from
    exactly what the kernel would get must equal the grouped path."""
    import torch.nn.functional as F

    from prefixserve.adapters import encoder as encoder_module

    def emulated(q, keys, values, batch):
        out = []
        for i in range(len(batch.cu_seqlens) - 1):
            qs, qe = int(batch.cu_seqlens[i]), int(batch.cu_seqlens[i + 1])
            ks, ke = int(batch.cu_seqlens_k[i]), int(batch.cu_seqlens_k[i + 1])
            assert qe - qs <= batch.max_q and ke - ks <= batch.max_k
            qi, ki, vi = (t.transpose(0, 1) for t in (q[qs:qe], keys[ks:ke], values[ks:ke]))  # (heads, L, d)
            out.append(F.scaled_dot_product_attention(qi, ki, vi).transpose(0, 1))  # (L, heads, d)
        return torch.cat(out)

    monkeypatch.setattr(encoder_module, "varlen", emulated)
    hf, enc = models
    rows = _rows(hf, torch.Generator().manual_seed(1))
    args = ([r[0] for r in rows], None)
    kw = dict(prompts=[r[2] for r in rows], prefixes=[r[3] for r in rows], position_start=enc.position_start)
    with torch.no_grad():
        grouped = enc(pack(*args, **kw))
        as_varlen = pack(*args, varlen=True, **kw)
        assert as_varlen.groups is None
        assert (enc(as_varlen) - grouped).abs().max() <= TOL


def test_dtype_auto_follows_the_hardware(monkeypatch):
    from prefixserve.adapters import backbone as backbone_module

    cpu = torch.device("cpu")
    monkeypatch.setattr(backbone_module, "cpu_has_fast_bf16", lambda: False)
    assert backbone_module.resolve_dtype("auto", cpu) == torch.float32  # AVX2 only: emulated bf16 is slower
    monkeypatch.setattr(backbone_module, "cpu_has_fast_bf16", lambda: True)
    assert backbone_module.resolve_dtype("auto", cpu) == torch.bfloat16  # AVX512-BF16 / AMX
    assert backbone_module.resolve_dtype("float32", cpu) == torch.float32
    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # H100 / H200
    assert backbone_module.resolve_dtype("auto", cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: no native bf16
    assert backbone_module.resolve_dtype("auto", cuda) == torch.float32
    with pytest.raises(Exception, match="dtype"):
        backbone_module.resolve_dtype("int8", cpu)


def test_bf16_serving_returns_float32_logits_close_to_fp32(tiny_backbones):
    from prefixserve.adapters.backbone import load_backbone
    from prefixserve.adapters.engine import Engine, Row
    from prefixserve.adapters.synthetic import random_adapter

    exact = load_backbone(tiny_backbones["roberta"], device="cpu", dtype="float32")
    half = load_backbone(tiny_backbones["roberta"], device="cpu", dtype="bfloat16")
    assert half.encoder.dtype == torch.bfloat16 and half.fingerprint == exact.fingerprint
    packed = random_adapter(exact.config, exact.fingerprint, num_virtual_tokens=4, labels=("a", "b", "c"))
    texts = ["the movie was good", "bad", "영화 재미 있다 정말 최고"]
    out = []
    for bb in (exact, half):
        engine = Engine(bb)
        adapter = engine.adapter("t/a@1", lambda: packed)
        out.append(torch.stack(engine.forward([Row(adapter, t) for t in texts])[0]))
    assert out[1].dtype == torch.float32
    assert 0 < (out[0] - out[1]).abs().max() < 0.1  # bf16 differs, but only by rounding
