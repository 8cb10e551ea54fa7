"""SeqFace losses (DESIGN §2) against plain loop implementations written here, in float64."""

from __future__ import annotations

import math

import pytest
import torch

from seqface_dist.losses import (
    center_index_from_reference_label,
    center_loss,
    center_update_delta,
    dsa_loss,
    dsa_terms,
    lambda_schedule,
    lsr_cross_entropy,
    margin_logits,
    margin_target_cos,
    psi,
    psi_from_cos,
    reference_label_from_center_index,
    reference_target_logit,
    sample_negatives,
    sphereface_logits,
)

F64 = torch.float64


# ---------------------------------------------------------------- plain loop references


def loop_psi(theta: float, m: int) -> float:
    for k in range(m):
        if k * math.pi / m <= theta <= (k + 1) * math.pi / m:
            return (-1) ** k * math.cos(m * theta) - 2 * k
    raise AssertionError(f"theta {theta} outside [0, pi]")


def loop_cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(y * y for y in b))
    return dot / (na * nb)


def loop_target(c: float, kind: str, m: int, lam: float, arc: float, cosm: float) -> float:
    if kind == "sphereface":
        return (lam * c + loop_psi(math.acos(max(-1.0, min(1.0, c))), m)) / (1 + lam)
    if kind == "arcface":
        theta = math.acos(c)
        return math.cos(theta + arc) if theta + arc <= math.pi else c - (1 - math.cos(arc))
    return c - cosm


def loop_logits(f, w, t, n_id, *, kind="sphereface", scale=32.0, m=4, lam=5.0, arc=0.5,
                cosm=0.35):
    out = []
    for i, fi in enumerate(f.tolist()):
        row = []
        for c, wc in enumerate(w.tolist()):
            cos = loop_cos(fi, wc)
            if int(t[i]) < n_id and c == int(t[i]):
                row.append(scale * loop_target(cos, kind, m, lam, arc, cosm))
            else:
                row.append(scale * cos)
        out.append(row)
    return torch.tensor(out, dtype=F64)


def loop_lsr(z, t, n_id) -> float:
    total = 0.0
    for row, ti in zip(z.tolist(), t.tolist(), strict=True):
        mx = max(row)
        lse = mx + math.log(sum(math.exp(v - mx) for v in row))
        if ti < n_id:
            total += lse - row[ti]
        else:
            total += sum(lse - v for v in row) / n_id
    return total / len(t)


def quarter_sq(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) / 4.0


def loop_dsa(f, t, c, n_id, negs, lam=0.5, alpha=2.0, beta=1.0):
    """Returns (loss, pull, push, active, counted) as Python numbers."""
    f, c, t, negs = f.tolist(), c.tolist(), t.tolist(), negs.tolist()
    pull = push = 0.0
    active = counted = 0
    for fi, ti in zip(f, t, strict=True):
        d_pos = quarter_sq(fi, c[ti])
        pull += lam * d_pos
        hinge_sum = 0.0
        for n in negs:
            if n == ti or (ti >= n_id and n >= n_id):
                continue
            counted += 1
            h = alpha * d_pos - quarter_sq(fi, c[n]) + beta
            if h > 0:
                active += 1
                hinge_sum += h
        if negs:
            push += (1 - lam) / len(negs) * hinge_sum
    b = len(f)
    return (pull + push) / b, pull / b, push / b, active, counted


def loop_center_update(f, t, c):
    f, c, t = f.tolist(), c.tolist(), t.tolist()
    delta = [[0.0] * len(c[0]) for _ in c]
    for n in set(t):
        members = [i for i, ti in enumerate(t) if ti == n]
        for k in range(len(c[0])):
            s = sum(f[i][k] - c[n][k] for i in members) / 2.0
            delta[n][k] = -s / (1 + len(members))
    return torch.tensor(delta, dtype=F64)


# ---------------------------------------------------------------- fixtures


def make_batch(kind: str, *, seed: int = 0, b: int = 8, d: int = 5, n_id: int = 6, n_seq: int = 5):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(b, d, generator=g, dtype=F64)
    weight = torch.randn(n_id, d, generator=g, dtype=F64)
    centers = torch.randn(n_id + n_seq, d, generator=g, dtype=F64)
    ids = torch.randint(0, n_id, (b,), generator=g)
    seqs = n_id + torch.randint(0, n_seq, (b,), generator=g)
    if kind == "identities":
        t = ids
    elif kind == "sequences":
        t = seqs
    else:
        t = torch.where(torch.arange(b) % 2 == 0, ids, seqs)
    return feats, weight, centers, t, n_id


BATCH_KINDS = ["identities", "sequences", "mixed"]


# ---------------------------------------------------------------- psi and margins


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_matches_loop_continuous_and_decreasing(m):
    theta = torch.linspace(0.0, math.pi, 4001, dtype=F64)
    values = psi(theta, m)
    expected = torch.tensor([loop_psi(x, m) for x in theta.tolist()], dtype=F64)
    torch.testing.assert_close(values, expected, rtol=0, atol=1e-12)
    steps = values[1:] - values[:-1]
    assert (steps < 0).all(), "psi must decrease strictly on [0, pi]"
    # |d psi / d theta| <= m, so neighbours differ by at most m * h: no jumps anywhere.
    h = float(theta[1] - theta[0])
    assert steps.abs().max() <= m * h * (1 + 1e-9)
    for k in range(1, m):
        edge = k * math.pi / m
        around = psi(torch.tensor([edge - 1e-9, edge + 1e-9], dtype=F64), m)
        assert abs(float(around[0] - around[1])) < 1e-7
    assert float(values[0]) == pytest.approx(1.0)
    assert float(values[-1]) == pytest.approx(-(2 * m - 1))


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_psi_from_cos_matches_psi_of_acos(m):
    cos = torch.linspace(-1.0, 1.0, 2001, dtype=F64)
    expected = torch.tensor([loop_psi(math.acos(c), m) for c in cos.tolist()], dtype=F64)
    torch.testing.assert_close(psi_from_cos(cos, m), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_target_gradient_finite_at_plus_minus_one(m):
    lam = 5.0
    cos = torch.tensor([1.0, -1.0], dtype=F64, requires_grad=True)
    margin_target_cos(cos, kind="sphereface", m=m, lam=lam).sum().backward()
    # d psi / d cos = (-1)^k m sin(m theta) / sin(theta) -> m^2 at both ends.
    expected = (lam + m * m) / (1 + lam)
    torch.testing.assert_close(cos.grad, torch.full((2,), expected, dtype=F64))


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_other_margins_gradient_finite_at_plus_minus_one(kind):
    cos = torch.tensor([1.0, -1.0, 1 - 1e-15, -1 + 1e-15], dtype=F64, requires_grad=True)
    margin_target_cos(cos, kind=kind).sum().backward()
    assert torch.isfinite(cos.grad).all()


@pytest.mark.parametrize("kind", ["sphereface", "arcface", "cosface"])
def test_margin_target_cos_matches_loop(kind):
    cos = torch.linspace(-0.999, 0.999, 301, dtype=F64)
    got = margin_target_cos(cos, kind=kind, m=3, lam=2.0, arcface_margin=0.4,
                            cosface_margin=0.3)
    expected = [loop_target(c, kind, 3, 2.0, 0.4, 0.3) for c in cos.tolist()]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=F64), rtol=0, atol=1e-12)


def test_lambda_schedule_formula():
    for step in (0, 1, 10, 1000, 100000):
        expected = max(5.0, 1000.0 * (1 + 0.12 * step) ** -1.0)
        assert lambda_schedule(step, base=1000.0) == pytest.approx(expected, rel=1e-15)
        assert lambda_schedule(step, base=1000.0, power=2.0, lambda_min=0.0) == pytest.approx(
            1000.0 / (1 + 0.12 * step) ** 2, rel=1e-15)
    assert lambda_schedule(0) == 5.0 and lambda_schedule(10**6) == 5.0  # reference: constant
    with pytest.raises(ValueError, match="step"):
        lambda_schedule(-1)


@pytest.mark.parametrize("batch", BATCH_KINDS)
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_sphereface_logits_match_loop(batch, m):
    f, w, _, t, n_id = make_batch(batch, seed=m)
    got = sphereface_logits(f, w, t, n_id, m=m, scale=32.0, lam=3.0)
    torch.testing.assert_close(got, loop_logits(f, w, t, n_id, m=m, lam=3.0), rtol=0,
                               atol=1e-10)
    seq_rows = t >= n_id
    plain = 32.0 * torch.nn.functional.normalize(f) @ torch.nn.functional.normalize(w).t()
    torch.testing.assert_close(got[seq_rows], plain[seq_rows])  # no margin for sequences


@pytest.mark.parametrize("kind", ["arcface", "cosface"])
def test_other_margin_logits_match_loop(kind):
    f, w, _, t, n_id = make_batch("mixed", seed=3)
    got = margin_logits(f, w, t, n_id, kind=kind, scale=16.0, arcface_margin=0.5,
                        cosface_margin=0.35)
    expected = loop_logits(f, w, t, n_id, kind=kind, scale=16.0, arc=0.5, cosm=0.35)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["sphereface", "arcface", "cosface"])
def test_chief_loss_gradcheck(kind):
    f, w, _, t, n_id = make_batch("mixed", seed=11, b=6, d=4, n_id=5)
    f.requires_grad_(True)
    w.requires_grad_(True)

    def chief(feats, weight):
        return lsr_cross_entropy(margin_logits(feats, weight, t, n_id, kind=kind, scale=4.0),
                                 t, n_id)

    assert torch.autograd.gradcheck(chief, (f, w))


# ---------------------------------------------------------------- reference (Caffe) gradient


def loop_reference_grad_x(x_row, w_row, g, lam, m):
    """The Caffe layer's d(target)/dx: unit-norm rescaled coefficients (not the true gradient)."""
    x_norm = math.sqrt(sum(v * v for v in x_row))
    c = loop_cos(x_row, w_row)
    theta = math.acos(c)
    k = min(int(m * theta / math.pi), m - 1)
    p = loop_psi(theta, m)
    dpsi = (-1) ** k * m * math.sin(m * theta) / math.sin(theta)
    a, b = dpsi, (p - c * dpsi) / x_norm
    norm = math.hypot(a, b)
    return [g / (1 + lam) * (lam * wk + a / norm * wk + b / norm * xk)
            for xk, wk in zip(x_row, w_row, strict=True)]


@pytest.mark.parametrize("m", [2, 4])
def test_reference_target_logit_backward_matches_loop(m):
    g = torch.Generator().manual_seed(5)
    x = 32.0 * torch.nn.functional.normalize(torch.randn(7, 4, generator=g, dtype=F64))
    w = torch.nn.functional.normalize(torch.randn(7, 4, generator=g, dtype=F64))
    upstream = torch.randn(7, generator=g, dtype=F64)
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = reference_target_logit(x, w, lam=5.0, m=m)
    expected_out = [32.0 * loop_target(loop_cos(a, b), "sphereface", m, 5.0, 0, 0)
                    for a, b in zip(x.tolist(), w.tolist(), strict=True)]
    torch.testing.assert_close(out, torch.tensor(expected_out, dtype=F64))
    (out * upstream).sum().backward()
    expected_x = [loop_reference_grad_x(a, b, gi, 5.0, m)
                  for a, b, gi in zip(x.tolist(), w.tolist(), upstream.tolist(), strict=True)]
    torch.testing.assert_close(x.grad, torch.tensor(expected_x, dtype=F64))
    torch.testing.assert_close(w.grad, upstream.unsqueeze(1) * x.detach())  # plain linear


def test_reference_grad_option_same_forward_different_target_gradient():
    f, w, _, t, n_id = make_batch("mixed", seed=2)
    grads = []
    for ref in (False, True):
        fr = f.clone().requires_grad_(True)
        logits = sphereface_logits(fr, w, t, n_id, reference_grad=ref)
        grads.append(torch.autograd.grad(lsr_cross_entropy(logits, t, n_id), fr)[0])
        torch.testing.assert_close(logits, sphereface_logits(f, w, t, n_id))
    seq_rows = t >= n_id
    torch.testing.assert_close(grads[0][seq_rows], grads[1][seq_rows])
    assert not torch.allclose(grads[0][~seq_rows], grads[1][~seq_rows])
    with pytest.raises(ValueError, match="reference_grad"):
        margin_logits(f, w, t, n_id, kind="arcface", reference_grad=True)


# ---------------------------------------------------------------- LSR


@pytest.mark.parametrize("batch", BATCH_KINDS)
def test_lsr_matches_loop(batch):
    f, w, _, t, n_id = make_batch(batch, seed=4)
    z = sphereface_logits(f, w, t, n_id)
    assert float(lsr_cross_entropy(z, t, n_id)) == pytest.approx(loop_lsr(z, t, n_id), rel=1e-12)


def test_lsr_identity_only_equals_cross_entropy():
    f, w, _, t, n_id = make_batch("identities", seed=6)
    z = sphereface_logits(f, w, t, n_id)
    torch.testing.assert_close(lsr_cross_entropy(z, t, n_id),
                               torch.nn.functional.cross_entropy(z, t))


@pytest.mark.parametrize("scale", [64.0, 128.0])
@pytest.mark.parametrize("batch", BATCH_KINDS)
def test_large_scale_is_finite(scale, batch):
    f, w, _, t, n_id = make_batch(batch, seed=8)
    # Put some features exactly on a class weight (cos = 1) and some opposite (cos = -1).
    f[0] = 3.0 * w[1]
    f[1] = -2.0 * w[2]
    f = f.float().requires_grad_(True)
    w = w.float().requires_grad_(True)
    z = sphereface_logits(f, w, t, n_id, scale=scale)
    loss = lsr_cross_entropy(z, t, n_id)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all() and torch.isfinite(w.grad).all()
    assert float(loss.detach()) == pytest.approx(loop_lsr(z.detach().double(), t, n_id),
                                                 rel=1e-4)


def test_lsr_gradcheck():
    g = torch.Generator().manual_seed(9)
    z = (10 * torch.randn(6, 5, generator=g, dtype=F64)).requires_grad_(True)
    t = torch.tensor([0, 4, 5, 7, 2, 9])
    assert torch.autograd.gradcheck(lambda x: lsr_cross_entropy(x, t, 5), (z,))


def test_bad_inputs_name_the_culprit():
    f, w, c, t, n_id = make_batch("mixed")
    with pytest.raises(ValueError, match=r"logits must have shape"):
        lsr_cross_entropy(torch.zeros(8, n_id + 1, dtype=F64), t, n_id)
    bad = t.clone()
    bad[3] = -2
    with pytest.raises(ValueError, match=r"center_index\[3\] = -2"):
        sphereface_logits(f, w, bad, n_id)
    bad[3] = c.shape[0]
    negs = torch.tensor([0])
    with pytest.raises(ValueError, match=rf"center_index\[3\] = {c.shape[0]} is outside"):
        dsa_loss(f, bad, c, n_id, negs)
    with pytest.raises(ValueError, match=r"negatives\[0\] = 99"):
        dsa_loss(f, t, c, n_id, torch.tensor([99]))
    with pytest.raises(ValueError, match="weight must have shape"):
        sphereface_logits(f, w[:-1], t, n_id)


def test_reference_label_round_trip():
    labels = torch.tensor([0, 5, -1, -4])
    idx = center_index_from_reference_label(labels, 6)
    assert idx.tolist() == [0, 5, 6, 9]
    assert reference_label_from_center_index(idx, 6).tolist() == labels.tolist()


# ---------------------------------------------------------------- DSA


def all_but_own_negatives(t: torch.Tensor, n_total: int) -> torch.Tensor:
    """Every center: includes the batch's own centers and sequence centers, to hit both rules."""
    return torch.arange(n_total)


@pytest.mark.parametrize("batch", BATCH_KINDS)
@pytest.mark.parametrize("lam,alpha,beta", [(0.5, 2.0, 1.0), (0.2, 1.5, 3.0)])
def test_dsa_matches_loop(batch, lam, alpha, beta):
    f, _, c, t, n_id = make_batch(batch, seed=12)
    negs = torch.tensor([0, 2, 3, 6, 7, 9, 10])
    terms = dsa_terms(f, t, c, n_id, negs, lam=lam, alpha=alpha, beta=beta)
    loss, pull, push, active, counted = loop_dsa(f, t, c, n_id, negs, lam, alpha, beta)
    assert float(terms.loss) == pytest.approx(loss, rel=1e-12)
    assert float(terms.pull) == pytest.approx(pull, rel=1e-12)
    assert float(terms.push) == pytest.approx(push, rel=1e-12, abs=1e-15)
    assert int(terms.num_counted) == counted and int(terms.num_active) == active
    assert float(terms.active_fraction) == pytest.approx(active / max(counted, 1))
    if batch == "mixed":
        assert 0 < active < counted  # the data exercise both hinge states


@pytest.mark.parametrize("batch", BATCH_KINDS)
def test_dsa_feature_gradient(batch):
    f, _, c, t, n_id = make_batch(batch, seed=13, b=6, d=4)
    negs = torch.tensor([1, 2, 5, 6, 8, 10])
    fr = f.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: dsa_loss(x, t, c, n_id, negs), (fr,))
    # Also against central differences of the loop implementation.
    grad = torch.autograd.grad(dsa_loss(fr, t, c, n_id, negs), fr)[0]
    h = 1e-6
    fd = torch.zeros_like(f)
    for i in range(f.shape[0]):
        for k in range(f.shape[1]):
            up, down = f.clone(), f.clone()
            up[i, k] += h
            down[i, k] -= h
            fd[i, k] = (loop_dsa(up, t, c, n_id, negs)[0] - loop_dsa(down, t, c, n_id, negs)[0]) / (
                2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_sequence_sample_never_pushed_from_sequence_center():
    f, _, c, _, n_id = make_batch("mixed", seed=14)
    t = torch.tensor([n_id + 1])
    fi = f[:1]
    c = c.clone()
    c[n_id + 2] = fi[0]  # another sequence center sitting on the feature: a huge hinge
    c[n_id + 3] = fi[0] + 0.01
    negs = torch.tensor([n_id + 2, n_id + 3])
    terms = dsa_terms(fi, t, c, n_id, negs)
    assert float(terms.push) == 0.0 and int(terms.num_counted) == 0
    d_pos = quarter_sq(fi[0].tolist(), c[n_id + 1].tolist())
    assert float(terms.loss) == pytest.approx(0.5 * d_pos)
    # The same center as an identity sample's negative does push.
    assert float(dsa_terms(fi, torch.tensor([0]), c, n_id, negs).push) > 0


def test_negative_equal_to_own_center_is_skipped_and_counted_in_S():
    f, _, c, _, n_id = make_batch("identities", seed=15)
    fi, t = f[:1], torch.tensor([2])
    own_only = dsa_terms(fi, t, c, n_id, torch.tensor([2]))
    assert float(own_only.push) == 0.0 and int(own_only.num_counted) == 0
    # |S| = 2 although one of the two is skipped: push = (1 - lam) / 2 * hinge(other).
    c = c.clone()
    c[4] = fi[0] + 0.1  # close negative: active hinge
    d_pos = quarter_sq(fi[0].tolist(), c[2].tolist())
    hinge = 2.0 * d_pos - quarter_sq(fi[0].tolist(), c[4].tolist()) + 1.0
    assert hinge > 0
    terms = dsa_terms(fi, t, c, n_id, torch.tensor([2, 4]))
    assert float(terms.push) == pytest.approx(0.5 / 2 * hinge, rel=1e-12)
    assert int(terms.num_counted) == 1 and float(terms.active_fraction) == 1.0


def test_lambda_one_equals_center_loss():
    f, _, c, t, n_id = make_batch("mixed", seed=16)
    negs = torch.arange(c.shape[0])
    results = []
    for fn in (lambda x, cc: dsa_loss(x, t, cc, n_id, negs, lam=1.0),
               lambda x, cc: center_loss(x, t, cc, n_id)):
        x, cc = f.clone().requires_grad_(True), c.clone().requires_grad_(True)
        loss = fn(x, cc)
        loss.backward()
        results.append((loss.detach(), x.grad, cc.grad))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)
    expected = sum(quarter_sq(a, c[i].tolist()) for a, i in zip(f.tolist(), t.tolist(),
                                                                 strict=True)) / len(t)
    assert float(results[1][0]) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("batch", BATCH_KINDS)
def test_center_update_matches_loop_and_ignores_loss_weight(batch):
    f, _, c, t, n_id = make_batch(batch, seed=17, b=10)
    t[1] = t[0]
    t[2] = t[0]  # a center with three members
    negs = torch.tensor([0, 3, 7, 9])
    expected = loop_center_update(f, t, c)
    grads = {}
    for weight in (0.04, 1.0):
        x, cc = f.clone().requires_grad_(True), c.clone().requires_grad_(True)
        (weight * dsa_loss(x, t, cc, n_id, negs)).backward()
        grads[weight] = (x.grad, cc.grad)
    torch.testing.assert_close(grads[1.0][1], expected)
    torch.testing.assert_close(grads[0.04][1], expected)  # independent of the loss weight
    torch.testing.assert_close(grads[0.04][0], 0.04 * grads[1.0][0])  # features do scale
    assert (expected[torch.tensor([n for n in range(c.shape[0]) if n not in t.tolist()],
                                  dtype=torch.long)] == 0).all()
    rows, delta = center_update_delta(f, t, c)
    torch.testing.assert_close(delta, expected[rows])
    assert sorted(rows.tolist()) == sorted(set(t.tolist()))
    cc = c.clone().requires_grad_(True)
    (0.04 * dsa_loss(f, t, cc, n_id, negs, sparse_center_grad=True)).backward()
    assert cc.grad.is_sparse and cc.grad._nnz() == len(set(t.tolist()))
    torch.testing.assert_close(cc.grad.to_dense(), expected)


def test_dsa_normalize_scale_matches_loop():
    f, _, c, t, n_id = make_batch("mixed", seed=18)
    s = 3.0
    fn = s * torch.nn.functional.normalize(f)
    cn = s * torch.nn.functional.normalize(c)
    negs = torch.tensor([1, 4, 6, 8])
    got = dsa_loss(f, t, c, n_id, negs, normalize_scale=s)
    assert float(got) == pytest.approx(loop_dsa(fn, t, cn, n_id, negs)[0], rel=1e-12)
    cc = c.clone().requires_grad_(True)
    dsa_loss(f, t, cc, n_id, negs, normalize_scale=s).backward()
    torch.testing.assert_close(cc.grad, loop_center_update(fn, t, cn))


@pytest.mark.parametrize("scale", [64.0, 128.0])
def test_dsa_large_features_finite(scale):
    f, _, c, t, n_id = make_batch("mixed", seed=19)
    f = (scale * torch.nn.functional.normalize(f)).float().requires_grad_(True)
    c = (scale * torch.nn.functional.normalize(c)).float().requires_grad_(True)
    loss = dsa_loss(f, t, c, n_id, torch.arange(c.shape[0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(f.grad).all() and torch.isfinite(c.grad).all()


# ---------------------------------------------------------------- negative sampler


@pytest.mark.parametrize("n,p", [(1000, 0.01), (1000, 0.99), (37, 0.5), (10, 0.0), (10, 1.0),
                                 (100, 0.29)])
def test_exact_sampler_size_distinct_range(n, p):
    got = sample_negatives(n, p, generator=torch.Generator().manual_seed(1), offset=500)
    assert got.dtype == torch.long
    assert got.numel() == math.floor(n * p)
    assert got.unique().numel() == got.numel()
    assert got.numel() == 0 or (500 <= int(got.min()) and int(got.max()) < 500 + n)


def test_sampler_seeded_reproducible():
    for mode in ("exact", "bernoulli"):
        a = sample_negatives(5000, 0.1, generator=torch.Generator().manual_seed(7), mode=mode)
        b = sample_negatives(5000, 0.1, generator=torch.Generator().manual_seed(7), mode=mode)
        c = sample_negatives(5000, 0.1, generator=torch.Generator().manual_seed(8), mode=mode)
        assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("p", [0.25, 0.6])  # rejection path (k <= n/4) and permutation path
def test_exact_sampler_is_uniform_over_centers(p):
    n, draws = 20, 4000
    g = torch.Generator().manual_seed(3)
    counts = torch.zeros(n)
    for _ in range(draws):
        counts[sample_negatives(n, p, generator=g)] += 1
    # Each center is in a draw with probability k/n; allow 6 binomial sigmas.
    q = math.floor(n * p) / n
    sigma = math.sqrt(draws * q * (1 - q))
    assert (counts - draws * q).abs().max() <= 6 * sigma


def test_bernoulli_sampler_expected_size():
    n, p = 200_000, 0.01
    got = sample_negatives(n, p, generator=torch.Generator().manual_seed(4), mode="bernoulli",
                           offset=10)
    sigma = math.sqrt(n * p * (1 - p))  # size ~ Binomial(n, p)
    assert abs(got.numel() - n * p) <= 6 * sigma
    assert got.unique().numel() == got.numel()
    assert 10 <= int(got.min()) and int(got.max()) < 10 + n
    g = torch.Generator().manual_seed(0)
    assert sample_negatives(50, 0.0, generator=g, mode="bernoulli").numel() == 0
    assert sample_negatives(50, 1.0, generator=g, mode="bernoulli").tolist() == list(range(50))


def test_sampler_rejects_bad_arguments():
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="p must be"):
        sample_negatives(10, 1.5, generator=g)
    with pytest.raises(ValueError, match="mode"):
        sample_negatives(10, 0.5, generator=g, mode="poisson")
    with pytest.raises(ValueError, match="offset"):
        sample_negatives(10, 0.5, generator=g, offset=-1)
