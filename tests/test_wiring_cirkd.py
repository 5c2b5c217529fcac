"""CIRKD entry-point wiring: which flag feeds which loss argument and which weight (specs/cirkd.md §1.3, §1.4,
§3.4–§3.7), the task loss's aux weight (§3.1) and a teacher that gets no gradient (§1.3 step 2, §3.7 FitNet).

The terms are built from ``build_parser().parse_args([...])`` with distinct flag values, and checked through
the built objects (term names and weights, the loss modules' attributes), so the tests survive a move of the
builder; the expected values are the spec's literals or hand arithmetic on the flag values.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cirkd import train_kd
from common.engine.step import TrainStep
from common.losses.fitnet import FitNet
from common.recipes import cirkd

pytestmark = pytest.mark.usefixtures("one_thread")

K = 19  # Cityscapes classes (§4.1)
C_S, C_T = 4, 8  # student / teacher embedding channels of the tests


def build(argv, aux=True):
    """The distillation terms and modules ``cirkd/train_kd.py`` builds for ``argv`` (Cityscapes, R18 student)."""
    args = train_kd.build_parser().parse_args(argv)
    terms, modules = train_kd.build_terms(args, K, aux, C_S, C_T, "batchnorm")
    return args, {t.name: t for t in terms}, modules


def weights(terms):
    return {name: term.weight for name, term in terms.items()}


def fn_of(term):
    """The loss object behind a term (a bound method's owner for the two-valued losses)."""
    return getattr(term.fn, "__self__", term.fn)


# ---- CIRKD (§1.3, §3.4, §3.5) ---------------------------------------------------------------------------------
def test_default_flags_build_the_cirkd_objective_of_3_5():
    _, terms, modules = build([])
    # L = CE + 0.4·CE_aux + 1.0·L_kd + 1.0·L_mb + 0.1·L_mp + 0.1·L_mr
    assert weights(terms) == {"kd": 1.0, "minibatch_pixel": 1.0, "memory_pixel": 0.1, "memory_region": 0.1}
    memory = modules["memory"]
    assert (memory.pixel_memory_size, memory.region_memory_size) == (20000, 2000)  # per class (§1.3)
    assert (memory.pixel_contrast_size, memory.region_contrast_size) == (216, 54)  # §3.4: Cityscapes 216 / 54
    assert memory.teacher_pixel_queue.shape == (K, 20000, C_T) and memory.teacher_segment_queue.shape == (K, 2000, C_T)
    assert (memory.contrast_temperature, memory.contrast_kd_temperature) == (0.1, 1.0)  # τ = 0.1, T_c = 1
    assert memory.faithful_pixel_enqueue is True  # §3.4 step 4: the original's defect by default
    assert fn_of(terms["kd"]).temperature == 1.0 and fn_of(terms["minibatch_pixel"]).temperature == 0.1


def test_each_cirkd_flag_feeds_its_own_argument_and_weight():
    _, terms, modules = build(["--pixel-memory-size", "41", "--region-memory-size", "23", "--pixel-contrast-size", "97",
                               "--region-contrast-size", "59", "--contrast-kd-temperature", "1.7",
                               "--contrast-temperature", "0.3", "--kd-temperature", "2.9", "--lambda-kd", "0.7",
                               "--lambda-minibatch-pixel", "1.3", "--lambda-memory-pixel", "0.11",
                               "--lambda-memory-region", "0.13"])
    assert weights(terms) == {"kd": 0.7, "minibatch_pixel": 1.3, "memory_pixel": 0.11, "memory_region": 0.13}
    memory = modules["memory"]
    assert (memory.pixel_memory_size, memory.region_memory_size) == (41, 23)
    assert memory.teacher_pixel_queue.shape == (K, 41, C_T) and memory.teacher_segment_queue.shape == (K, 23, C_T)
    # per class m = contrast_size // K + 1 (§3.4): 97 // 19 + 1 = 6 pixel, 59 // 19 + 1 = 4 region negatives
    assert (memory.pixel_contrast_size, memory.region_contrast_size) == (6, 4)
    assert (memory.contrast_kd_temperature, memory.contrast_temperature) == (1.7, 0.3)
    assert fn_of(terms["minibatch_pixel"]).temperature == 0.3  # the mini-batch relation uses τ too (§3.3)
    assert fn_of(terms["kd"]).temperature == 2.9
    head = memory.project_head
    assert (head[0].in_channels, head[0].out_channels, head[3].out_channels) == (C_S, C_T, C_T)  # §3.4
    assert fn_of(terms["memory_pixel"]) is fn_of(terms["memory_region"])  # one call gives both (§3.4)
    assert terms["memory_pixel"].inputs == terms["memory_region"].inputs == ("s.feat", "t.feat", "labels")


def test_cirkd_weights_zero_build_no_memory():
    _, terms, modules = build(["--lambda-memory-pixel", "0", "--lambda-memory-region", "0"])
    assert weights(terms) == {"kd": 1.0, "minibatch_pixel": 1.0} and "memory" not in modules


# ---- the baselines of train_kd.py (§1.4, §3.6, §3.7) ----------------------------------------------------------
CIRKD_OFF = ["--lambda-minibatch-pixel", "0", "--lambda-memory-pixel", "0", "--lambda-memory-region", "0"]
# §3.6 "Default weights of all methods": flags of each row -> the weighted terms it must build
TABLE_3_6 = {
    "KD": ([], {"kd": 1.0}),
    "AT": (["--lambda-at", "10000"], {"kd": 1.0, "at": 10000.0}),
    "FitNet": (["--lambda-fitnet", "10"], {"kd": 1.0, "fitnet": 10.0}),
    "SKD": (["--lambda-skd", "10", "--lambda-adv", "0.001", "--lambda-d", "0.1"], {"kd": 1.0, "skd": 10.0}),
    "IFVD": (["--lambda-ifv", "20", "--lambda-adv", "0.001", "--lambda-d", "0.1"], {"kd": 1.0, "ifv": 20.0}),
    "CWD": (["--lambda-cwd-fea", "50", "--lambda-cwd-logit", "3", "--lambda-adv", "0.001", "--lambda-d", "0.1"],
            {"kd": 1.0, "cwd_fea": 50.0, "cwd_logit": 3.0}),
    "DSD": (["--lambda-kd", "0", "--lambda-psd", "1000", "--lambda-csd", "10"], {"psd": 1000.0, "csd": 10.0}),
}


@pytest.mark.parametrize("method", sorted(TABLE_3_6))
def test_the_weight_table_of_3_6_builds_its_terms(method):
    flags, expected = TABLE_3_6[method]
    _, terms, _ = build(CIRKD_OFF + flags)
    assert weights(terms) == expected


def test_each_baseline_flag_feeds_its_own_term():
    _, terms, modules = build(CIRKD_OFF + ["--lambda-kd", "23", "--lambda-skd", "2", "--lambda-cwd-fea", "3",
                                           "--lambda-cwd-logit", "5", "--lambda-ifv", "7", "--lambda-at", "11",
                                           "--lambda-fitnet", "13", "--lambda-psd", "17", "--lambda-csd", "19"])
    assert weights(terms) == {"kd": 23.0, "skd": 2.0, "cwd_fea": 3.0, "cwd_logit": 5.0, "ifv": 7.0, "at": 11.0,
                              "fitnet": 13.0, "psd": 17.0, "csd": 19.0}
    # the embedding terms read the embeddings, CWD's logit term the logits (§3.6 "CWD(feat) + CWD(logits)")
    assert terms["cwd_fea"].inputs == ("s.feat", "t.feat") and terms["cwd_logit"].inputs == ("s.logits", "t.logits")
    assert terms["kd"].inputs == ("s.logits", "t.logits")
    assert fn_of(terms["cwd_fea"]) is fn_of(terms["cwd_logit"]) is modules["cwd"]  # one instance, both uses (§3.7)
    assert modules["fitnet"].conv.in_channels == C_S and modules["fitnet"].conv.out_channels == C_T
    assert fn_of(terms["ifv"]).num_classes == K


def test_adversarial_flags_feed_the_generator_and_discriminator_weights():
    args = train_kd.build_parser().parse_args(["--lambda-adv", "0.003", "--lambda-d", "0.7"])
    adversary = train_kd.build_parts(args, train_kd.contract_context(args, K, True, C_S, C_T, "batchnorm")).adversary
    assert (adversary.lambda_adv, adversary.lambda_d) == (0.003, 0.7)
    assert adversary.adv_type == "hinge" and adversary.poly is False  # §1.4: hinge, constant Adam lr
    assert adversary.optimizer.defaults["lr"] == 4e-4 and adversary.optimizer.defaults["betas"] == (0.9, 0.99)


# ---- the task loss (§1.1, §3.1) -------------------------------------------------------------------------------
def test_task_loss_is_ce_plus_0_4_aux_for_resnet_and_ce_for_mobile():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=generator)
    aux = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=generator)
    labels = torch.randint(0, 3, (2, 8, 8), generator=generator)
    labels[0, :3] = -1  # CIRKD's ignore label

    def ce(x):  # bilinear, align_corners=True, to the label size; CE over the non-ignored pixels (§3.1)
        return F.cross_entropy(F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=True), labels,
                               ignore_index=-1)

    assert cirkd.derive_aux("resnet18") is True and cirkd.derive_aux("mobilenetv2") is False  # §1.1
    with_aux = cirkd.task_term(True)
    assert with_aux.inputs == ("s.logits", "s.aux", "labels") and with_aux.weight == 1.0
    torch.testing.assert_close(with_aux.fn(logits, aux, labels), ce(logits) + 0.4 * ce(aux), rtol=0, atol=1e-14)
    mobile = cirkd.task_term(False)
    assert mobile.inputs == ("s.logits", "labels")
    torch.testing.assert_close(mobile.fn(logits, labels), ce(logits), rtol=0, atol=1e-14)


# ---- no gradient into the teacher (§1.3 step 2, §3.7) ---------------------------------------------------------
def test_fitnet_sends_no_gradient_into_the_teacher_features():
    loss = FitNet(C_S, C_T).double()
    s = torch.randn(2, C_S, 3, 3, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, C_T, 3, 3, dtype=torch.float64, requires_grad=True)
    loss(s, t).backward()
    assert t.grad is None and s.grad is not None and loss.conv.weight.grad is not None


class TinySegNet(nn.Module):
    """``[logits, feat]`` at the input size: a 3x3 conv embedding (``channels``) and a 1x1 classifier."""

    output_names = ("logits", "feat")

    def __init__(self, channels, classes=3):
        super().__init__()
        self.embed = nn.Conv2d(3, channels, 3, padding=1)
        self.classify = nn.Conv2d(channels, classes, 1)

    def forward(self, x):
        feat = self.embed(x.to(self.embed.weight.dtype))
        return [self.classify(torch.relu(feat)), feat]


def test_a_fitnet_step_leaves_the_teacher_without_gradient():
    _, terms, modules = build(CIRKD_OFF + ["--lambda-kd", "0", "--lambda-fitnet", "10"])
    assert list(terms) == ["fitnet"]
    torch.manual_seed(0)
    student, teacher = TinySegNet(C_S).double(), TinySegNet(C_T).double()
    modules = {name: m.double() for name, m in modules.items()}
    grad_enabled = []
    teacher.register_forward_hook(lambda module, inputs, output: grad_enabled.append(torch.is_grad_enabled()))
    params = list(student.parameters()) + [p for m in modules.values() for p in m.parameters()]
    step = TrainStep(student, task=cirkd.task_term(False), optimizer=torch.optim.SGD(params, lr=0.1), base_lr=0.1,
                     device="cpu", teacher=teacher, terms=list(terms.values()), modules=modules)
    adapter_before = modules["fitnet"].conv.weight.detach().clone()
    labels = torch.randint(0, 3, (2, 6, 6), generator=torch.Generator().manual_seed(1))
    step((torch.randn(2, 3, 6, 6), labels), 0)
    assert grad_enabled == [False]  # the teacher forward runs under no_grad
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert not torch.equal(modules["fitnet"].conv.weight, adapter_before)  # the adapter is trained
