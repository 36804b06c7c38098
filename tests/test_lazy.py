"""load_lazily: binding by name, load on first use, the LRU budget, load_state_dict-style reports."""

from __future__ import annotations

import pytest
import torch

import torchpool
import torchpool.lazy
from checkpoint_gen import TinyLlama, llama_like, write_file, write_sharded

CFG = dict(layers=4, hidden=64, inter=128, vocab=256)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("lazy")
    sd = llama_like(seed=3, **CFG)
    return write_sharded(d / "ck", sd, 3), sd


def _ids():
    return torch.arange(24).reshape(2, 12) % CFG["vocab"]


def _reference(sd):
    m = TinyLlama(**CFG)
    m.load_state_dict(sd)
    with torch.no_grad():
        return m(_ids())


@pytest.mark.parametrize("mode", ["auto", "read"])
def test_budgeted_forward_equals_unbudgeted(ckpt, mode):
    idx, sd = ckpt
    want = _reference(sd)
    with torch.device("meta"):
        m_all = TinyLlama(**CFG)
    m_all = torchpool.load_lazily(m_all, idx, mode=mode)
    layer_bytes = sum(v.nbytes for k, v in sd.items() if k.startswith("model.layers.0."))
    budget = int(layer_bytes * 1.5)
    m_b = torchpool.load_lazily(lambda: TinyLlama(**CFG), idx, budget_bytes=budget, mode=mode)
    assert torchpool.lazy.stats(m_b)["checkpoint"]["bytes_read"] == 0  # nothing read before the forward
    assert torchpool.lazy.is_unloaded(next(m_b.parameters()))  # not loaded (its device says where it will be)
    with torch.no_grad():
        out_all = m_all(_ids())
        out_b = m_b(_ids())
        out_b2 = m_b(_ids())  # evicted modules come back
    assert torch.equal(out_all, want) and torch.equal(out_b, want) and torch.equal(out_b2, want)
    s = torchpool.lazy.stats(m_b)
    assert s["evictions"] > 0 and s["over_budget"] == 0  # every module fits: the budget always holds
    assert 0 < s["peak_resident_bytes"] <= budget and s["resident_bytes"] <= budget
    s_all = torchpool.lazy.stats(m_all)
    assert s_all["evictions"] == 0 and s_all["resident_bytes"] == sum(v.nbytes for v in sd.values())
    if mode == "read":
        assert s["checkpoint"]["bytes_read"] >= sum(v.nbytes for v in sd.values())
        assert s["checkpoint"]["staging"]["bytes_staged"] == s["checkpoint"]["bytes_read"]


def test_budget_holds_when_every_module_fits(tmp_path):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)])
    path = write_file(tmp_path / "seq.safetensors", dict(layers.state_dict()))
    x = torch.randn(4, 32)
    with torch.no_grad():
        want = layers(x)
    per = 32 * 32 * 4 + 32 * 4
    with torch.device("meta"):
        lazy = torch.nn.Sequential(*[torch.nn.Linear(32, 32) for _ in range(8)])
    lazy = torchpool.load_lazily(lazy, path, budget_bytes=3 * per)
    with torch.no_grad():
        assert torch.equal(lazy(x), want)
    s = torchpool.lazy.stats(lazy)
    assert s["peak_resident_bytes"] <= 3 * per and s["over_budget"] == 0 and s["evictions"] == 5 and s["loads"] == 8
    torchpool.lazy.binding(lazy).evict_all()
    assert torchpool.lazy.stats(lazy)["resident_bytes"] == 0


def test_reports_like_load_state_dict(tmp_path):
    sd = {"0.weight": torch.randn(4, 3), "0.bias": torch.randn(4), "extra": torch.ones(1)}
    path = write_file(tmp_path / "m.safetensors", sd)

    def model():
        return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))

    with pytest.raises(RuntimeError) as ei:
        torchpool.load_lazily(model, path)
    msg = str(ei.value)
    ref = model()
    with pytest.raises(RuntimeError) as ref_err:
        ref.load_state_dict(sd)
    assert msg.splitlines()[0] == str(ref_err.value).splitlines()[0] == "Error(s) in loading state_dict for Sequential:"
    assert 'Missing key(s) in state_dict: "1.weight", "1.bias".' in msg and 'Unexpected key(s) in state_dict: "extra".' in msg
    with pytest.raises(RuntimeError, match=r"the checkpoint lacks are on the meta device: 1.weight, 1.bias"):
        torchpool.load_lazily(model, path, strict=False)  # built on meta: they would be garbage
    with pytest.warns(UserWarning, match=r"missing \(left as built\): 1.weight, 1.bias; unexpected \(not loaded\): extra"):
        m = torchpool.load_lazily(model(), path, strict=False)  # built real: kept as built
    assert torchpool.lazy.binding(m).missing_keys == ["1.weight", "1.bias"]
    assert torchpool.lazy.binding(m).unexpected_keys == ["extra"]
    m(torch.ones(1, 3))
    assert torch.equal(m[0].weight, sd["0.weight"]) and m[1].weight.device.type == "cpu"

    path2 = write_file(tmp_path / "s.safetensors", {"weight": torch.randn(5, 3), "bias": torch.randn(4)})
    with pytest.raises(RuntimeError, match=r"size mismatch for weight: copying a param with shape torch.Size\(\[5, 3\]\)"):
        torchpool.load_lazily(lambda: torch.nn.Linear(3, 4), path2)
    path3 = write_file(tmp_path / "d.safetensors", {"weight": torch.randn(4, 3).bfloat16(), "bias": torch.randn(4).bfloat16()})
    with pytest.raises(RuntimeError, match="dtype mismatch for weight"):
        torchpool.load_lazily(lambda: torch.nn.Linear(3, 4), path3)
    lin = torchpool.load_lazily(lambda: torch.nn.Linear(3, 4, dtype=torch.bfloat16), path3)
    assert lin(torch.ones(2, 3, dtype=torch.bfloat16)).shape == (2, 4)
    lin32 = torchpool.load_lazily(lambda: torch.nn.Linear(3, 4), path3, dtype=torch.float32)
    assert lin32(torch.ones(2, 3)).dtype == torch.float32


def test_buffers_and_materialize(tmp_path):
    bn = torch.nn.BatchNorm1d(6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.eval()
    path = write_file(tmp_path / "bn.safetensors", dict(bn.state_dict()))
    with torch.device("meta"):
        lazy = torch.nn.BatchNorm1d(6)
    lazy = torchpool.load_lazily(lazy.eval(), path)
    x = torch.randn(3, 6)
    assert torch.equal(lazy(x), bn(x))
    torchpool.lazy.binding(lazy).evict_all()
    torchpool.lazy.materialize(lazy)
    assert torch.equal(lazy.running_mean, bn.running_mean)


def test_exception_in_forward_does_not_pin_modules(tmp_path):
    path = write_file(tmp_path / "l.safetensors", {"weight": torch.randn(4, 3), "bias": torch.randn(4)})
    m = torchpool.load_lazily(lambda: torch.nn.Linear(3, 4), path, budget_bytes=1)
    with pytest.raises(RuntimeError):
        m(torch.ones(2, 5))
    assert torchpool.lazy.binding(m).bound[id(m)].active == 0
    assert torchpool.lazy.stats(m)["over_budget"] == 1  # larger than the budget alone: counted, still loaded
    assert m(torch.ones(2, 3)).shape == (2, 4)


class TiedLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.mid = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 16, bias=False)
        self.head.weight = self.emb.weight  # one Parameter under two names
        self.register_buffer("scale", torch.full((8,), 0.5), persistent=False)

    def forward(self, ids):
        return self.head(self.mid(self.emb(ids)) * self.scale)


def test_tied_weights_bound_once_and_kept_under_budget(tmp_path):
    torch.manual_seed(1)
    real = TiedLM()
    sd = {k: v for k, v in real.state_dict().items() if k != "head.weight"}  # stored once, as HF does
    path = write_file(tmp_path / "t.safetensors", sd)
    ids = torch.tensor([[1, 2, 3, 15]])
    want = real(ids)
    per = 16 * 8 * 4
    m = torchpool.load_lazily(TiedLM, path, budget_bytes=per + 8 * 8 * 4 + 8 * 4 - 1)
    b = torchpool.lazy.binding(m)
    assert b.tied == {"emb.weight": ["emb.weight", "head.weight"]} and b.missing_keys == []
    assert m.scale.device.type == "cpu"  # built under init_empty_weights: buffers real
    for _ in range(3):
        assert torch.equal(m(ids), want)
        assert m.head.weight is m.emb.weight
    s = torchpool.lazy.stats(m)
    assert s["evictions"] >= 2 and s["bound_units"] == 2 and s["peak_resident_bytes"] <= b.budget_bytes
    # load + assign with the same rules
    m2 = torchpool.load_into(TiedLM, path)
    assert m2.head.weight is m2.emb.weight and torch.equal(m2(ids), want)
    # a checkpoint that stores both names with different values: the model ties what the file does not
    bad = dict(sd, **{"head.weight": torch.randn(16, 8)})
    path2 = write_file(tmp_path / "bad.safetensors", bad)
    m3 = torchpool.load_lazily(TiedLM, path2)
    with pytest.raises(RuntimeError, match="ties emb.weight, head.weight .* stores 'emb.weight' and 'head.weight' with different"):
        m3(ids)
    same = dict(sd, **{"head.weight": sd["emb.weight"].clone()})
    m4 = torchpool.load_lazily(TiedLM, write_file(tmp_path / "same.safetensors", same))
    assert torch.equal(m4(ids), want)


def test_legacy_buffer_key_skipped_and_reported(tmp_path):
    torch.manual_seed(2)
    real = TiedLM()
    sd = {k: v for k, v in real.state_dict().items() if k != "head.weight"}
    sd["scale"] = torch.full((8,), 0.5)  # an old checkpoint that still stores a now non-persistent buffer
    path = write_file(tmp_path / "l.safetensors", sd)
    m = torchpool.load_lazily(TiedLM, path)
    assert torchpool.lazy.binding(m).ignored_keys == ["scale"]
    assert torch.equal(m(torch.tensor([[3]])), real(torch.tensor([[3]])))
