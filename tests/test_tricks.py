"""Each trick against the paper's formula, with hand-computed numbers where the formula gives them."""
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_src.models.resnet import ResNet
from pipeline_src.tricks.distillation import distillation_loss
from pipeline_src.tricks.label_smoothing import smooth_targets, soft_target_cross_entropy
from pipeline_src.tricks.linear_scaling import scaled_lr
from pipeline_src.tricks.lr_schedule import build_scheduler, lr_at
from pipeline_src.tricks.mixed_precision import autocast_context, autocast_dtype, make_grad_scaler
from pipeline_src.tricks.mixup import mixup, sample_beta
from pipeline_src.tricks.no_bias_decay import param_groups
from pipeline_src.tricks.warmup import warmup_factor, warmup_iterations
from pipeline_src.tricks.zero_gamma import apply_zero_gamma

CPU = torch.device("cpu")
# 10 iterations per epoch, 12 epochs, 2 warmup epochs (W = 20), milestones 6 and 9, base LR 0.4
SCHED = dict(iters_per_epoch=10, epochs=12, warmup_epochs=2, milestones=[6, 9], gamma=0.1)


def tiny_resnet(variant: str = "D") -> ResNet:
    return ResNet(26, variant, 0.0625, 5, "xavier")


# ---- linear scaling and warmup ---------------------------------------------------------------


def test_linear_scaling():
    assert scaled_lr(0.1, 1024, 256, True) == pytest.approx(0.4)
    assert scaled_lr(0.1, 128, 32, True) == pytest.approx(0.4)
    assert scaled_lr(0.1, 1024, 256, False) == 0.1
    with pytest.raises(ValueError, match="batch sizes"):
        scaled_lr(0.1, 0, 256, True)


def test_warmup_factor():
    assert warmup_iterations(2, 10) == 20 and warmup_iterations(0.5, 10) == 5
    assert [warmup_factor(i, 4) for i in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert warmup_factor(0, 0) == 1.0
    with pytest.raises(ValueError, match="iteration must be >= 0"):
        warmup_factor(-1, 4)


# ---- LR schedules ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "iteration, expected",
    [(0, 0.02), (9, 0.2), (19, 0.4), (20, 0.4), (59, 0.4), (60, 0.04), (89, 0.04), (90, 0.004), (119, 0.004)],
)
def test_step_schedule_with_warmup(iteration, expected):
    assert lr_at(iteration, base_lr=0.4, schedule="step", **SCHED) == pytest.approx(expected)


@pytest.mark.parametrize(
    "iteration, expected",
    # T = 120 - 20 = 100; lr = 0.4 * (1 + cos(pi t / 100)) / 2 with t = i - 20
    [(0, 0.02), (19, 0.4), (20, 0.4), (45, 0.34142136), (70, 0.2), (95, 0.05857864), (119, 9.8688e-5),
     (120, 0.0)],
)
def test_cosine_schedule_with_warmup(iteration, expected):
    assert lr_at(iteration, base_lr=0.4, schedule="cosine", **SCHED) == pytest.approx(expected, abs=1e-8)


def test_schedules_without_warmup_start_at_base_lr():
    no_warmup = {**SCHED, "warmup_epochs": 0}
    assert lr_at(0, base_lr=0.1, schedule="step", **no_warmup) == 0.1
    assert lr_at(0, base_lr=0.1, schedule="cosine", **no_warmup) == 0.1
    assert lr_at(60, base_lr=0.1, schedule="cosine", **no_warmup) == pytest.approx(0.05)  # T = 120
    with pytest.raises(ValueError, match="schedule 'linear'"):
        lr_at(0, base_lr=0.1, schedule="linear", **no_warmup)


def _sgd(lr: float) -> torch.optim.SGD:
    model = nn.Linear(3, 2)
    return torch.optim.SGD(param_groups(model, 1e-4, True), lr=lr, momentum=0.9, nesterov=True)


@pytest.mark.parametrize("schedule", ["step", "cosine"])
def test_scheduler_matches_lr_at_and_resumes_exactly(schedule):
    opt = _sgd(0.4)
    sched = build_scheduler(opt, schedule=schedule, **SCHED)
    seen = []
    for _ in range(65):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()  # no gradients: a no-op, but the order LambdaLR expects
        sched.step()
    assert seen == pytest.approx([lr_at(i, base_lr=0.4, schedule=schedule, **SCHED) for i in range(65)])
    assert all(g["lr"] == opt.param_groups[0]["lr"] for g in opt.param_groups)  # both param groups

    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = _sgd(0.4)
    sched2 = build_scheduler(opt2, schedule=schedule, **SCHED)
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    for _ in range(40):
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
        opt.step()
        opt2.step()
        sched.step()
        sched2.step()
    assert sched2.last_epoch == sched.last_epoch == 105


# ---- label smoothing -------------------------------------------------------------------------


def test_smooth_targets_uses_paper_formula():
    q = smooth_targets(torch.tensor([2, 0]), num_classes=5, eps=0.1)
    assert q.dtype == torch.float32
    expected = torch.full((2, 5), 0.025)  # eps / (K - 1) = 0.1 / 4
    expected[0, 2] = expected[1, 0] = 0.9  # 1 - eps
    assert torch.allclose(q, expected)
    assert torch.allclose(q.sum(1), torch.ones(2))
    assert torch.equal(smooth_targets(torch.tensor([1]), 3, 0.0), torch.tensor([[0.0, 1.0, 0.0]]))
    with pytest.raises(ValueError, match="1-d integer"):
        smooth_targets(torch.tensor([1.0]), 3, 0.1)


def test_soft_cross_entropy_equals_torch_ce_for_one_hot():
    torch.manual_seed(0)
    logits, labels = torch.randn(8, 6) * 3, torch.randint(0, 6, (8,))
    one_hot = smooth_targets(labels, 6, 0.0)
    assert torch.allclose(soft_target_cross_entropy(logits, one_hot), F.cross_entropy(logits, labels))
    # the paper's smoothing is torch's with eps' = eps K / (K - 1); it is not torch's at the same eps
    eps = 0.1
    ours = soft_target_cross_entropy(logits, smooth_targets(labels, 6, eps))
    assert torch.allclose(ours, F.cross_entropy(logits, labels, label_smoothing=eps * 6 / 5))
    assert not torch.allclose(ours, F.cross_entropy(logits, labels, label_smoothing=eps))


# ---- mixup -----------------------------------------------------------------------------------


def test_mixup_mixes_inputs_and_targets_with_one_partner_permutation():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 3, 4, 4)
    y = smooth_targets(torch.arange(6), 6, 0.1)
    x_mixed, y_mixed, lam = mixup(x, y, 0.2, gen)
    assert 0.0 <= lam <= 1.0
    rest = (x_mixed - lam * x) / (1.0 - lam)  # should be x[partner]
    partner = [int(torch.cdist(rest[i].flatten()[None], x.flatten(1)).argmin()) for i in range(6)]
    assert sorted(partner) == list(range(6))  # a permutation of the batch
    assert torch.allclose(x_mixed, lam * x + (1 - lam) * x[partner], atol=1e-6)
    assert torch.allclose(y_mixed, lam * y + (1 - lam) * y[partner], atol=1e-6)
    assert torch.allclose(y_mixed.sum(1), torch.ones(6))


def test_mixup_is_reproducible_from_the_generator_state():
    x, y = torch.randn(8, 3, 2, 2), smooth_targets(torch.arange(8) % 4, 4, 0.0)
    a = mixup(x, y, 0.2, torch.Generator().manual_seed(7))
    b = mixup(x, y, 0.2, torch.Generator().manual_seed(7))
    assert a[2] == b[2] and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    gen = torch.Generator().manual_seed(7)
    mixup(x, y, 0.2, gen)
    state = gen.get_state()  # checkpointed mid-run
    after = mixup(x, y, 0.2, gen)
    resumed = mixup(x, y, 0.2, torch.Generator().set_state(state))
    assert after[2] == resumed[2] and torch.equal(after[0], resumed[0])
    with pytest.raises(ValueError, match="float targets"):
        mixup(x, torch.arange(8), 0.2, gen)


@pytest.mark.parametrize("alpha", [0.2, 1.0, 4.0])
def test_beta_sampler_moments(alpha):
    gen = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_beta(alpha, gen) for _ in range(4000)], dtype=torch.float64)
    assert draws.min() >= 0.0 and draws.max() <= 1.0
    assert abs(draws.mean().item() - 0.5) < 0.02
    assert draws.var().item() == pytest.approx(1.0 / (4.0 * (2.0 * alpha + 1.0)), rel=0.08)
    if alpha < 1:  # U-shaped: most mass near 0 and 1
        assert ((draws < 0.1) | (draws > 0.9)).double().mean() > 0.5


# ---- no bias decay ---------------------------------------------------------------------------


def test_no_bias_decay_groups():
    model = tiny_resnet()
    conv_fc = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    everything = {id(p) for p in model.parameters()}

    on = param_groups(model, 1e-4, no_bias_decay=True)
    decayed = [id(p) for g in on if g["weight_decay"] > 0 for p in g["params"]]
    free = [id(p) for g in on if g["weight_decay"] == 0 for p in g["params"]]
    assert [g["weight_decay"] for g in on] == [1e-4, 0.0]
    assert set(decayed) == conv_fc and len(decayed) == len(conv_fc)
    assert len(free) + len(decayed) == len(everything) and set(free) | set(decayed) == everything
    bn_and_bias = {id(m.weight) for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    bn_and_bias |= {id(m.bias) for m in model.modules() if getattr(m, "bias", None) is not None}
    assert set(free) == bn_and_bias

    off = param_groups(model, 1e-4, no_bias_decay=False)
    assert len(off) == 1 and off[0]["weight_decay"] == 1e-4
    assert [id(p) for p in off[0]["params"]] == [id(p) for p in model.parameters()]
    torch.optim.SGD(on, lr=0.1)  # valid optimizer groups


# ---- zero gamma ------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["A", "D"])
def test_zero_gamma_zeroes_exactly_the_last_bn_of_each_block(variant):
    model = tiny_resnet(variant)
    assert apply_zero_gamma(model) == 8  # ResNet-26: 2 + 2 + 2 + 2 blocks
    bns = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    zeroed = [name for name, m in bns.items() if not m.weight.any()]
    assert len(zeroed) == 8 and all(name.endswith(".bn3") for name in zeroed)
    for name, m in bns.items():
        assert torch.all(m.bias == 0)
        if name not in zeroed:
            assert torch.all(m.weight == 1)
    # a zero-gamma block is its shortcut at first: an identity block returns relu(x)
    block = model.layer1[1].eval()
    x = torch.randn(1, block.conv1.in_channels, 4, 4)
    assert torch.equal(block(x), torch.relu(x))


# ---- distillation ----------------------------------------------------------------------------


def test_distillation_loss_matches_formula_and_only_trains_the_student():
    torch.manual_seed(0)
    z = (torch.randn(4, 10) * 2).requires_grad_()
    r = (torch.randn(4, 10) * 2).requires_grad_()
    p = smooth_targets(torch.randint(0, 10, (4,)), 10, 0.1)
    T, w = 20.0, 0.7
    loss = distillation_loss(z, r, p, T, w)

    hard = -(p * torch.log(torch.softmax(z, 1))).sum(1).mean()
    soft = -(torch.softmax(r / T, 1) * torch.log(torch.softmax(z / T, 1))).sum(1).mean()
    assert torch.allclose(loss, hard + w * T**2 * soft)
    assert torch.allclose(distillation_loss(z, r, p, T, 0.0), hard)

    loss.backward()
    assert r.grad is None  # the teacher is detached
    assert z.grad is not None and z.grad.abs().sum() > 0


# ---- mixed precision -------------------------------------------------------------------------


def test_autocast_dtypes():
    assert autocast_dtype(CPU, "amp") == torch.bfloat16
    assert autocast_dtype(CPU, "fp32") is None
    assert autocast_dtype(torch.device("cuda"), "amp") == torch.float16
    layer = nn.Linear(4, 4)
    with autocast_context(CPU, "amp"):
        assert layer(torch.randn(2, 4)).dtype == torch.bfloat16
    with autocast_context(CPU, "fp32"):
        assert layer(torch.randn(2, 4)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision 'fp16'"):
        autocast_dtype(CPU, "fp16")


def test_cpu_amp_step_never_touches_cuda(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA was touched on a CPU run")

    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    monkeypatch.setattr(torch.cuda, "_lazy_init", no_cuda)
    monkeypatch.setattr(torch.cuda, "current_device", no_cuda)
    for precision in ("amp", "fp32"):
        layer = nn.Linear(4, 3)
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        scaler = make_grad_scaler(CPU, precision)
        assert not scaler.is_enabled()
        before = layer.weight.detach().clone()
        with autocast_context(CPU, precision):
            targets = smooth_targets(torch.arange(5) % 3, 3, 0.1)
            loss = soft_target_cross_entropy(layer(torch.randn(5, 4)), targets)
        assert loss.dtype == torch.float32  # the loss is computed in fp32 under autocast too
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert layer.weight.dtype == torch.float32 and not torch.equal(layer.weight, before)
