"""Unlearning methods on tiny digits MLPs: what each method promises, its compute count, and that a
member unlearned in a stack equals the same member unlearned alone (decision 23)."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.batches import Member
from pipeline.config import DataConfig, ModelConfig, TrainConfig
from pipeline.data.datasets import load_dataset
from pipeline.data.device import DeviceData
from pipeline.margins import stacked_logits
from pipeline.models import build_model
from pipeline.training.optim import StackedSGD
from pipeline.training.recipe import train_members
from pipeline.unlearn import get_method
from pipeline.unlearn import camu, del_, scrub, sfron
from pipeline.unlearn.base import ComputeMeter, Context, ForgetRows, batch_inputs, member_params
from pipeline.unlearn.matching import finetune_index_set, retain_rng

MODEL = ModelConfig(name="mlp", hidden=16)
CLASSES = 10


class Setup:
    def __init__(self):
        torch.manual_seed(0)
        ds = load_dataset(DataConfig())
        mean, std = ds.channel_stats()
        self.data = DeviceData(ds.train_x, ds.train_y, ds.val_x, ds.val_y, mean, std)
        n = self.data.n_train
        self.n_points = n + len(ds.val_y)
        members = [Member(seed, np.arange(n)) for seed in (11, 12, 13)]
        train = TrainConfig(epochs=2, batch_size=64, lr=0.05, warmup_epochs=1)
        self.model, _ = train_members(MODEL, train, self.data, members, CLASSES)
        self.forget = np.arange(3, 3 + 20 * 7, 7)
        self.retain = np.setdiff1d(np.arange(n), self.forget)
        g = torch.Generator().manual_seed(1)
        # a shared per-class shift (learnable) plus noise (not learnable)
        shift = torch.randn(CLASSES, generator=g) / len(self.forget)
        self.rows = shift + 0.02 * torch.randn(len(self.forget), self.n_points, CLASSES, generator=g)
        self.oracle = torch.randn(self.n_points, CLASSES, generator=g)

    def ctx(self, model_indices=(0, 1, 2), model_cfg=MODEL) -> Context:
        def fresh(members):  # as the unlearn stage: model indices in, seeds derived from them
            return build_model(model_cfg, [100 + i for i in members], self.data.shape, CLASSES)

        return Context(
            data=self.data, classes=CLASSES, seed=5, model_indices=list(model_indices), make_fresh_model=fresh,
            _forget_rows=lambda: ForgetRows.from_rows(self.rows, self.forget),
            _target_oracle_logits=lambda: self.oracle,
        )

    def copy(self, idx=(0, 1, 2)):
        return self.model.select(list(idx))


@pytest.fixture(scope="module")
def s() -> Setup:
    return Setup()


def run_method(s, name, params, model=None, idx=(0, 1, 2), retain=None):
    mod = get_method(name)
    meter = ComputeMeter()
    model = s.copy(idx) if model is None else model
    out = mod.run(s.ctx(idx), model, s.forget, s.retain if retain is None else retain,
                  mod.Config(**params), meter)
    return out, meter


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------------ dm-direct
def test_dm_direct_is_the_hand_subtraction(s):
    out, meter = run_method(s, "dm_direct", {"multiplier": 0.5})
    base = stacked_logits(s.model, s.data.all_images(), s.data.normalize)
    torch.testing.assert_close(out.logits, base - 0.5 * s.rows.sum(0)[None])
    assert out.model is None and meter.forward_only == s.n_points and meter.backward == 0

    diag, _ = run_method(s, "dm_direct", {"diagonal_only": True})
    expected = base.clone()
    for k, i in enumerate(s.forget):
        expected[:, i] -= s.rows[k, i]
    torch.testing.assert_close(diag.logits, expected)


# ------------------------------------------------------------------------------------------ OM / DMM
def test_index_set_repeats_forget_and_caps_retain():
    forget, retain = np.arange(10), np.arange(100, 130)
    idx, notes = finetune_index_set(forget, retain, 2.5, 20, np.random.default_rng(0))
    np.testing.assert_array_equal(idx[:25], np.concatenate([forget, forget, forget[:5]]))
    assert len(idx) == 25 + 30 and set(idx[25:]) == set(retain)  # 200 wanted, capped at 30
    assert notes["retain_capped"] and notes["retain_points_wanted"] == 200 and notes["retain_points_used"] == 30


def _mse(model, s, points, targets):
    x, _ = batch_inputs(s.data, points, model.n_models)
    with torch.no_grad():
        return (model(x) - targets).pow(2).mean(dim=(1, 2))


def test_oracle_matching_reduces_mse_and_counts_passes(s):
    model = s.copy()
    idx, _ = finetune_index_set(s.forget, s.retain, 5, 20, retain_rng())
    points = np.unique(idx)
    target = s.oracle[points][None]
    before = _mse(model, s, points, target)
    out, meter = run_method(s, "oracle_matching", {"lr": 3e-3, "batch_size": 64, "epochs": 2}, model=model)
    after = _mse(out.model, s, points, target)
    assert (after < 0.9 * before).all()
    assert meter.backward == 2 * (5 * 20 + 20 * 20) and meter.forward_only == 0  # epochs x (r_f + r_r)|F|


def test_dmm_reduces_mse_to_its_own_dm_direct_targets(s):
    model = s.copy()
    idx, _ = finetune_index_set(s.forget, s.retain, 5, 20, retain_rng())
    points = np.unique(idx)
    base = stacked_logits(s.model, s.data.train_x[torch.as_tensor(points)], s.data.normalize)
    target = base - s.rows.sum(0)[points][None]
    before = _mse(model, s, points, target)
    out, meter = run_method(s, "dmm", {"lr": 3e-3, "batch_size": 64, "epochs": 2}, model=model)
    after = _mse(out.model, s, points, target)
    assert (after < 0.9 * before).all()
    assert meter.backward == 2 * 500 and meter.forward_only == len(points)


def test_finetune_compute_count(s):
    _, meter = run_method(s, "finetune", {"epochs": 2, "batch_size": 100})
    assert meter.backward == 2 * len(s.retain) and meter.forward_only == 0


# ------------------------------------------------------------------------------------------ DEL
def test_del_channel_scores_and_exact_budget():
    g = torch.Generator().manual_seed(0)
    scores = {"conv.weight": torch.rand(2, 20, 3, 3, 3, generator=g), "bn.weight": torch.rand(2, 20, generator=g),
              "fc.weight": torch.rand(2, 10, 20, generator=g)}
    ch = del_.channel_scores(scores, 0.1)
    top2 = scores["conv.weight"].flatten(2).topk(2, dim=2).values.mean(2)  # h = floor(0.1 * 20) = 2
    torch.testing.assert_close(ch["conv.weight"], top2[:, :, None, None, None].expand(2, 20, 3, 3, 3))
    top1 = scores["fc.weight"].max(2).values  # h = max(1, floor(1.0)) = 1
    torch.testing.assert_close(ch["fc.weight"], top1[:, :, None].expand(2, 10, 20))
    assert torch.equal(ch["bn.weight"], scores["bn.weight"])
    masks = del_.budget_mask(ch, 0.3)  # channel ties straddle the threshold: still exactly k entries
    total = sum(v[0].numel() for v in masks.values())
    per_member = sum(v.flatten(1).sum(1) for v in masks.values())
    assert per_member.tolist() == [int(0.3 * total)] * 2


def test_del_budget_on_a_conv_net(s):
    cnn = build_model(ModelConfig(name="cnn", hidden=4), [1, 2], s.data.shape, CLASSES)
    ctx = s.ctx((0, 1))
    scores = del_.channel_scores(del_.criticality(ctx, cnn, s.forget, 8, ComputeMeter()), 0.1)
    masks = del_.budget_mask(scores, 0.3)
    total = sum(p[0].numel() for p in cnn.parameters())
    assert [int(v) for v in sum(m.flatten(1).sum(1) for m in masks.values())] == [int(0.3 * total)] * 2


def test_del_touches_only_masked_entries_and_the_head(s):
    original = s.copy()
    ctx = s.ctx()
    meter = ComputeMeter()
    masks = del_.budget_mask(del_.channel_scores(del_.criticality(ctx, s.copy(), s.forget, 128, meter), 0.1), 0.3)
    assert meter.backward == len(s.forget)  # forget set under one batch: its partial batch counts
    out, meter = run_method(s, "del", {"epochs": 1})
    assert meter.backward == len(s.forget) + len(s.retain)
    n_entries = sum(v[0].numel() for v in masks.values())
    assert out.notes["masked_entries"] == [int(0.3 * n_entries)] * 3
    before, after = params_of(original), params_of(out.model)
    for name, mask in masks.items():
        if name.startswith(original.head_prefix):
            assert not torch.equal(before[name], after[name])
            continue
        keep = ~mask.bool()
        assert torch.equal(after[name][keep], before[name][keep]), name
    changed = sum(int((after[n] != before[n])[masks[n].bool()].sum()) for n in masks)
    assert changed > 0.9 * sum(int(m.sum()) for m in masks.values())


def test_del_weight_decay_is_the_pretraining_s_and_moves_only_trained_entries(s):
    assert del_.Config().weight_decay == TrainConfig().weight_decay == 5e-4
    masks = del_.budget_mask(del_.channel_scores(del_.criticality(s.ctx(), s.copy(), s.forget, 128, ComputeMeter()),
                                                 0.1), 0.3)
    outs = {wd: run_method(s, "del", {"epochs": 1, "weight_decay": wd})[0].model for wd in (0.0, 5e-4)}
    before, a, b = params_of(s.copy()), params_of(outs[0.0]), params_of(outs[5e-4])
    for name, mask in masks.items():
        trained = torch.ones_like(mask, dtype=torch.bool) if name.startswith("fc.") else mask.bool()
        assert torch.equal(a[name][~trained], before[name][~trained]) and torch.equal(b[name][~trained], a[name][~trained])
        if trained.any():
            assert not torch.equal(a[name][trained], b[name][trained]), name  # the decay reached what trains


def test_del_head_kept_out_of_the_reset(s):
    """reset_head false: the final layer ranks last, so no head entry is reset; the budget is unchanged."""
    scores = del_.channel_scores(del_.criticality(s.ctx(), s.copy(), s.forget, 128, ComputeMeter()), 0.1)
    ranked = del_.budget_mask(scores, 0.1)
    kept = del_.budget_mask(scores, 0.1, exclude="fc.")
    assert sum(float(ranked[n].sum()) for n in ranked if n.startswith("fc.")) > 0  # the reference resets head rows
    assert all(float(kept[n].sum()) == 0 for n in kept if n.startswith("fc."))
    assert sum(float(v.sum()) for v in kept.values()) == sum(float(v.sum()) for v in ranked.values())
    out, _ = run_method(s, "del", {"epochs": 1, "reset_head": False, "budget": 0.1})
    assert out.notes["masked_entries"] == [sum(float(v[0].sum()) for v in kept.values())] * 3


# ------------------------------------------------------------------------------------------ SFR-on
def test_sfron_ascent_step_leaves_unmasked_entries(s):
    cfg = sfron.Config(reference_step=False)
    model, m = s.copy(), 3
    opt = StackedSGD(member_params(model), cfg.momentum, cfg.weight_decay)
    x, y = batch_inputs(s.data, s.retain[:64], m)
    lr = torch.full((m,), 0.01)
    sfron.descent_step(model, opt, x, y, lr)  # leaves momentum in every entry
    g = torch.Generator().manual_seed(3)
    masks = [(torch.rand(p.shape, generator=g) < 0.3).float() for p in opt.params]
    xf, yf = batch_inputs(s.data, s.forget, m)
    before = [p.detach().clone() for p in opt.params]
    norms = sfron.ascent_step(model, opt, masks, xf, yf, 25.0, lr, cfg)
    assert norms.shape == (m,)
    for p, b, mask in zip(opt.params, before, masks):
        assert torch.equal(p[mask == 0], b[mask == 0])
        assert (p[mask == 1] != b[mask == 1]).float().mean() > 0.9
    # reference semantics, the default: momentum and weight decay still move the unmasked entries
    ref = sfron.Config()
    assert ref.reference_step
    before = [p.detach().clone() for p in opt.params]
    sfron.ascent_step(model, opt, masks, xf, yf, 25.0, lr, ref)
    assert any(not torch.equal(p[mask == 0], b[mask == 0]) for p, b, mask in zip(opt.params, before, masks))


def test_sfron_fishers_from_equal_batches(s):
    """Both Fishers from batches of min(fisher_batch_size, |F|): here |F| = 20 < 128, so the retain Fisher
    is the mean over batches of 20 too, and the mask is the ratio of those two."""
    cfg = sfron.Config()
    assert sfron.fisher_batch(cfg, s.forget) == len(s.forget) == 20
    assert sfron.fisher_batch(sfron.Config(fisher_batch_size=8), s.forget) == 8
    retain = s.retain[:300]
    meter = ComputeMeter()
    masks = sfron.saliency_mask(s.ctx(), s.copy(), s.forget, retain, cfg, meter)
    assert meter.backward == len(s.forget) + len(retain)
    ff = sfron.fisher_diagonal(s.ctx(), s.copy(), s.forget, 20, ComputeMeter(), "forget")
    fr = sfron.fisher_diagonal(s.ctx(), s.copy(), retain, 20, ComputeMeter(), "retain")
    for mask, a, b in zip(masks, ff, fr):
        assert torch.equal(mask, ((a + 1e-15) / (b + 1e-15) >= 1.0).to(mask.dtype))
    # a retain Fisher from larger batches is smaller (the squared batch-mean gradient shrinks with the
    # batch), so unequal batches mark more entries salient, the bias equal batches remove
    fr_big = sfron.fisher_diagonal(s.ctx(), s.copy(), retain, 128, ComputeMeter(), "retain")
    unequal = sum(float(((a + 1e-15) / (b + 1e-15) >= 1.0).sum()) for a, b in zip(ff, fr_big))
    assert unequal > sum(float(m.sum()) for m in masks)


def test_sfron_adaptive_weights_and_compute(s):
    losses = torch.tensor([[1.0, 4.0], [0.25, 0.25]])
    w = sfron.adaptive_weights(losses, 0.5)
    torch.testing.assert_close(w, torch.tensor([[4 / 3, 2 / 3], [1.0, 1.0]]))
    _, meter = run_method(s, "sfron", {"n_iters": 6, "forget_freq": 3, "batch_size": 10})
    fisher = len(s.forget) + len(s.retain)
    assert meter.backward == fisher + 2 * 10 + 6 * 10  # ascent at t = 0, 3; descent every t


# ------------------------------------------------------------------------------------------ CaMU
def test_camu_loss_terms_on_a_tiny_case(s):
    cfg = camu.Config()
    student, original = s.copy([0]), s.copy([1])
    x_s, y_s = batch_inputs(s.data, s.retain[:4], 1)
    x_f, y_f = batch_inputs(s.data, s.forget[:4], 1)
    x_cf = x_s + 0.5
    y_cf = (y_s + 1) % CLASSES
    kl = torch.nn.KLDivLoss(reduction="sum")
    with torch.no_grad():
        z0_s, z0_cf = original.features(x_s)[0], original.features(x_cf)[0]
        z_s, z_f = student.features(x_s)[0], student.features(x_f)[0]
        expected_a = 0.5 * kl(F.log_softmax(z_s, 1), F.softmax(z0_s, 1)) + \
            0.5 * kl(F.log_softmax(z_f, 1), F.softmax(z0_cf, 1))
        expected_b = 0.9 * F.cross_entropy(student(x_s)[0], y_s[0]) + 0.01 * F.cross_entropy(student(x_f)[0], y_cf[0])
    torch.testing.assert_close(camu.step_a_loss(student, original, x_s, x_f, x_cf, cfg)[0], expected_a)
    torch.testing.assert_close(camu.step_b_loss(student, x_s, y_s, x_f, y_cf, cfg)[0], expected_b)


def test_camu_counterfactuals(s):
    sample = s.retain[:20]
    pf, ps, x_cf, y_cf = camu.counterfactuals(np.random.default_rng(0), s.data, s.forget, sample, CLASSES, 1.0,
                                              "normalized")
    assert sorted(pf) == sorted(s.forget) and sorted(ps) == sorted(sample)
    y_f, y_s = s.data.train_y[pf], s.data.train_y[ps]
    assert (y_cf != y_f).all() and (y_cf[y_s != y_f] == y_s[y_s != y_f]).all()
    noise = x_cf - s.data.normalize(s.data.train_x[ps])
    assert noise.min() >= -1e-5 and noise.max() < 1 + 1e-5 and noise.std() > 0.2


def test_camu_noise_spans_the_raw_pixel_range(s):
    """The default (raw): U[0, 1) of the pixel range, as the reference's ToTensor images; digits' pixels
    are 0..16, so in normalized units the noise is U[0, 16 / std) and, mapped back to pixels, U[0, 16)."""
    assert camu.Config().noise_space == "raw"
    assert int(s.data.train_x.max()) == 16 and int(s.data.train_x.min()) == 0
    sample = s.retain[:20]
    _, ps, x_cf, _ = camu.counterfactuals(np.random.default_rng(0), s.data, s.forget, sample, CLASSES, 1.0, "raw")
    noise_pixels = (x_cf - s.data.normalize(s.data.train_x[ps])) * s.data.std  # back to pixel units
    assert noise_pixels.min() >= -1e-3 and noise_pixels.max() < 16 + 1e-3
    assert noise_pixels.max() > 15.5 and abs(float(noise_pixels.mean()) - 8) < 0.3  # spans it, mean range / 2
    torch.testing.assert_close(camu.noise_scale(s.data, "raw"), 16 / s.data.std)


# ------------------------------------------------------------------------------------------ SCRUB
def test_scrub_updates_the_student_not_the_teacher(s):
    student, teacher = s.copy(), s.copy()
    before = params_of(teacher)
    cfg = scrub.Config(epochs=1, msteps=1)
    meter = ComputeMeter()
    scrub.scrub_loop(s.ctx(), student, teacher, s.forget, s.retain[:128], cfg, meter)
    assert all(torch.equal(before[n], p) for n, p in teacher.named_parameters())
    assert all(not torch.equal(before[n], p) for n, p in student.named_parameters())
    assert meter.backward == meter.forward_only == len(s.forget) + 128


# ------------------------------------------------------------------------------------------ batched = alone
SMALL = {
    "dm_direct": {},
    "oracle_matching": {"lr": 1e-3, "epochs": 2},
    "dmm": {"lr": 1e-3, "epochs": 2},
    "del": {"epochs": 1},
    "sfron": {"n_iters": 10, "forget_freq": 2, "batch_size": 32},
    "camu": {"epochs": 2, "kl_lr": 1e-3, "impair_lr": 1e-3},
    "neggrad_plus": {"epochs": 1},
    "scrub": {"epochs": 2, "msteps": 1},
}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_member_in_a_stack_equals_member_alone(s, name):
    retain = s.retain[:400]
    stacked, _ = run_method(s, name, SMALL[name], retain=retain)
    alone, _ = run_method(s, name, SMALL[name], idx=(2,), retain=retain)
    if name == "dm_direct":
        torch.testing.assert_close(stacked.logits[2:], alone.logits, rtol=1e-5, atol=1e-5)
        return
    a, b = params_of(stacked.model), params_of(alone.model)
    moved = max(float((a[n][2] - s.model.get_parameter(n)[2].detach()).abs().max()) for n in a)
    assert moved > 1e-4  # the method did something
    for n in a:
        torch.testing.assert_close(a[n][2:], b[n], rtol=1e-4, atol=1e-5, msg=f"{name}: {n}")


@pytest.mark.parametrize("name", ["del", "sfron"])
def test_conv_net_member_in_a_stack_equals_member_alone(s, name):
    """Channel scores over conv kernels and per-member BatchNorm in train mode."""
    cnn_cfg = ModelConfig(name="cnn", hidden=4)
    cnn = build_model(cnn_cfg, [21, 22], s.data.shape, CLASSES)
    mod, cfg = get_method(name), get_method(name).Config(**SMALL[name])
    retain = s.retain[:200]
    stacked = mod.run(s.ctx((0, 1), cnn_cfg), cnn.select([0, 1]), s.forget, retain, cfg, ComputeMeter()).model
    alone = mod.run(s.ctx((1,), cnn_cfg), cnn.select([1]), s.forget, retain, cfg, ComputeMeter()).model
    for n, p in stacked.state_dict().items():
        torch.testing.assert_close(p[1:], alone.state_dict()[n], rtol=1e-4, atol=1e-5, msg=f"{name}: {n}")
    assert not torch.equal(stacked.state_dict()["fc.weight"][1], cnn.state_dict()["fc.weight"][1])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_every_method_under_loop_stacking_is_exact_to_the_member_alone(s, name):
    """Decision 28: under `loop` each member runs its own dense kernels, so a member unlearned in a
    stack is bit-identical to the member unlearned alone (convolutions and BatchNorm included)."""
    cnn_cfg = ModelConfig(name="cnn", hidden=4)
    cnn = build_model(cnn_cfg, [21, 22], s.data.shape, CLASSES, stacking="loop")
    mod, cfg = get_method(name), get_method(name).Config(**SMALL[name])
    retain = s.retain[:200]
    stacked = mod.run(s.ctx((0, 1), cnn_cfg), cnn.select([0, 1]), s.forget, retain, cfg, ComputeMeter())
    alone = mod.run(s.ctx((1,), cnn_cfg), cnn.select([1]), s.forget, retain, cfg, ComputeMeter())
    if name == "dm_direct":
        assert torch.equal(stacked.logits[1:], alone.logits)
        return
    for n, p in stacked.model.state_dict().items():
        assert torch.equal(p[1:], alone.model.state_dict()[n]), f"{name}: {n}"


# ------------------------------------------------------------------------------------------ independent models
def test_each_member_draws_its_own_batches_from_its_model_index(s):
    """Model i's randomness comes from (stage, model i) only (issue 14, item 6): two members of one
    block see different batch orders, and member 2 sees the same order in any block."""
    ctx = s.ctx((0, 1, 2))
    batches = ctx.member_batches(s.retain[:200], 64, "finetune", 0)
    assert [b.shape for b in batches] == [(3, 64)] * 3 + [(3, 8)]
    first = np.concatenate(batches, axis=1)
    assert all(sorted(row) == sorted(s.retain[:200]) for row in first)
    assert not np.array_equal(first[0], first[1]) and not np.array_equal(first[1], first[2])
    alone = np.concatenate(s.ctx((2,)).member_batches(s.retain[:200], 64, "finetune", 0), axis=1)
    np.testing.assert_array_equal(alone[0], first[2])


@pytest.mark.parametrize("name", ["finetune", "gradient_ascent", "camu", "oracle_matching"])
def test_identical_members_end_different(s, name):
    """Two copies of the same full model unlearned side by side end as two different models: the
    unlearning noise is not shared across the models KLoM compares."""
    params = {"finetune": {"epochs": 1}, "gradient_ascent": {"epochs": 1, "batch_size": 8},
              "camu": {"epochs": 1, "kl_lr": 1e-3, "impair_lr": 1e-3},
              "oracle_matching": {"lr": 1e-3, "epochs": 1, "batch_size": 64}}[name]
    twins = s.model.select([0, 0])
    out, _ = run_method(s, name, params, model=twins, idx=(0, 1), retain=s.retain[:400])
    p = params_of(out.model)
    assert any(not torch.equal(v[0], v[1]) for v in p.values()), name


def test_om_and_dmm_share_the_reference_retain_draw(s, monkeypatch):
    """OM and DMM fine-tune on the same retain points, drawn once with the reference's seed 42,
    whatever their hyperparameters and models."""
    from pipeline.unlearn import dmm, oracle_matching

    seen = []
    for mod in (dmm, oracle_matching):
        monkeypatch.setattr(mod, "match_logits", lambda ctx, model, index_set, *a, **k: seen.append(index_set))
    run_method(s, "oracle_matching", {"lr": 1e-3, "epochs": 1})
    run_method(s, "dmm", {"lr": 3e-3, "epochs": 2, "multiplier": 0.5}, idx=(1, 2))
    want, _ = finetune_index_set(s.forget, s.retain, 5, 20, np.random.default_rng(42))
    assert len(seen) == 2
    for got in seen:
        np.testing.assert_array_equal(got, want)
