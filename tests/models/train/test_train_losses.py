"""Loss terms: pair loss, weight coupling, anchor, group sparsity."""
import pytest

torch = pytest.importorskip("torch")

from models.train import losses as L  # noqa: E402


def test_binary_pair_loss_prefers_matching_embeddings():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(32, 128, generator=g)
    ident = torch.arange(32)
    s, b = torch.tensor(10.0), torch.tensor(-5.0)
    good, st = L.binary_pair_loss(e, e + 0.01 * torch.randn(32, 128, generator=g), ident, s, b, hard_k=4)
    bad, _ = L.binary_pair_loss(e, torch.randn(32, 128, generator=g), ident, s, b, hard_k=4)
    assert good < bad
    assert st["pos_cos"] > 0.99


def test_pair_loss_treats_same_identity_as_positive():
    e = torch.nn.functional.normalize(torch.randn(4, 8), dim=1)
    ident = torch.tensor([0, 0, 1, 2])
    s, b = torch.tensor(10.0), torch.tensor(0.0)
    # identity 0 appears twice: (0,1) and (1,0) are positives, never mined as negatives
    live = e.clone()
    live[1] = e[0]
    loss, _ = L.binary_pair_loss(e, live, ident, s, b, hard_k=1)
    assert torch.isfinite(loss)


def test_hard_negative_gradient_flows():
    e_id = torch.randn(16, 32, requires_grad=True)
    e_live = torch.randn(16, 32, requires_grad=True)
    loss, _ = L.binary_pair_loss(e_id, e_live, torch.arange(16), torch.tensor(5.0), torch.tensor(0.0))
    loss.backward()
    assert e_id.grad.abs().sum() > 0 and e_live.grad.abs().sum() > 0


def test_group_lasso_counts_units():
    w = torch.zeros(3, 10)
    w[:, 2] = torch.tensor([3.0, 4.0, 0.0])
    assert float(L.group_lasso(w)) == pytest.approx(5.0)
    assert float(L.l1(w)) == pytest.approx(7.0)


def test_dual_towers_coupling_and_anchor():
    from models.build.dlib_resnet import DlibResNet
    from models.train.towers import DualTowers, trainable_names
    torch.manual_seed(0)
    base = DlibResNet().eval()
    m = DualTowers(base, heads=True)
    names = trainable_names(m.id.net)
    assert all(n.startswith(("stages.level1.", "stages.level0.", "fc.")) for n in names)
    assert not any(p.requires_grad for n, p in m.id.net.named_parameters() if n not in names)
    assert float(m.coupling()) == 0.0 and float(m.anchor("live")) == 0.0
    w = m.layer_weight["fc.weight"]
    assert w == pytest.approx(1.0 / float(base.fc.weight.pow(2).sum()))
    with torch.no_grad():
        m.id.net.fc.weight[0, 0] += 0.1
        m.live.net.fc.weight[0, 0] -= 0.2
    assert float(m.coupling()) == pytest.approx(0.09 * w, rel=1e-4)
    assert float(m.anchor("live")) == pytest.approx(0.04 * w, rel=1e-4)
    shared = DualTowers(base, shared=True)
    assert shared.live is shared.id and float(shared.coupling()) == 0.0


def test_head_losses_mask_missing_labels():
    from models.train.heads import build_heads, head_losses, sparsity
    heads = build_heads(128)
    e = torch.randn(6, 128)
    nan = float("nan")
    t = {"gender": torch.tensor([0, 1, nan, nan, 1, 0]), "race": torch.full((6,), nan),
         "age": torch.tensor([20.0, 30, 40, nan, nan, 50])}
    out = heads(e)
    hl = head_losses(out, t, {"age": (35.0, 10.0)})
    assert set(hl) == {"gender", "age"}
    assert all(torch.isfinite(v) for v in hl.values())
    assert float(sparsity(heads)) > 0


def test_adapt_map_mode_touches_only_tied_units():
    """`idverify adapt --mode map`: only the ATTR head and the fc rows of the tied units move."""
    import numpy as np
    from models.build.dlib_resnet import DlibResNet
    from models.train.adapt import adapt
    from models.train.towers import DualTowers
    torch.manual_seed(0)
    model = DualTowers(DlibResNet().eval(), heads=True)
    before = {side: {n: p.detach().clone() for n, p in getattr(model, side).trainable().items()}
              for side in ("id", "live")}
    other_head = model.heads.heads["gender"].weight.detach().clone()
    rng = np.random.default_rng(0)
    n = 80
    d = {f"{v}_feat": rng.normal(size=(n, 128, 8, 8)).astype(np.float16) for v in ("chip", "live")}
    d.update({f"{v}_ok": np.ones(n, bool) for v in ("chip", "live")})
    d["age"] = rng.uniform(10, 70, n).astype(np.float32)
    ties = [3, 17, 90]
    adapt(model, "age", d, {"age": (40.0, 15.0)}, "map", ties, steps=3, seed=0)
    for side in ("id", "live"):
        after = getattr(model, side).trainable()
        for name, w0 in before[side].items():
            w1 = after[name].detach()
            if name == "fc.weight":
                changed = (w1 != w0).any(dim=1).nonzero().flatten().tolist()
                assert changed and set(changed) <= set(ties)
            else:
                assert torch.equal(w1, w0), name
    assert torch.equal(model.heads.heads["gender"].weight.detach(), other_head)
