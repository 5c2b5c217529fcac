"""The holistic (adversarial) part shared by ``skd``, ``ifvd`` and ``cwd``: a SAGAN discriminator on the logits,
its own optimizer and schedule (specs/ifvd_skd.md §C.3–C.4, §C.8; cwd.md §5.5; cirkd.md §1.4, §3.7).

One set of parameters, with each method's own defaults:

* ``adv`` (λ_adv, the student's ``−mean D(z_S)``), ``d`` (λ_d, the D loss), ``gp`` (λ_gp of WGAN-GP);
  the discriminator is built when ``adv`` or ``d`` is nonzero;
* ``adv_type`` ``wgan-gp`` (SKD/IFVD/CWD) or ``hinge`` (CIRKD's baselines);
* ``d_optimizer`` ``adam`` (Adam(``d_lr``, betas (0.9, 0.99)), IFVD/CWD/CIRKD) or ``sgd``
  (SGD(``d_lr``, ``d_momentum``, ``d_weight_decay``), SKD); ``d_poly`` poly or constant D lr (CIRKD);
* ``d_order``: the D step's call order, ``student_first`` (IFVD, CWD, CIRKD) or ``teacher_first`` (SKD);
* ``d_preprocess`` (1 BN, 2 tanh, 3 x/255) and ``d_conv_dim`` (64) of the discriminator. Its input BN is
  the pair's norm when that is a plain BN (``batchnorm``/``syncbn``, CIRKD), else ``nn.BatchNorm2d``.
"""
from common.engine.lr import make_adam, make_sgd
from common.engine.step import Adversary
from common.losses import adversarial
from common.losses.adversarial import ADV_TYPES
from common.methods.registry import bn_layer, check_adversary_input
from common.models import Discriminator

PARAMS = {"adv": 0.001, "d": 0.1, "gp": 10.0, "adv_type": "wgan-gp", "d_optimizer": "adam", "d_lr": 4e-4,
          "d_momentum": 0.9, "d_weight_decay": 0.0, "d_poly": True, "d_order": "student_first", "d_preprocess": 1,
          "d_conv_dim": 64}
WEIGHTS = ("adv", "d")
CHOICES = {"adv_type": ADV_TYPES, "d_optimizer": ("adam", "sgd"), "d_order": ("student_first", "teacher_first")}
OFF = {"adv": 0.0, "d": 0.0}
SKD = {"d_optimizer": "sgd", "d_weight_decay": 5e-4, "d_order": "teacher_first"}
CIRKD = {"adv_type": "hinge", "d_poly": False}


def build_d_optimizer(discriminator, kind="adam", lr=4e-4, betas=(0.9, 0.99), momentum=0.9, weight_decay=0.0):
    """The ``D_solver`` over D's trainable parameters (the spectral-norm u/v vectors are excluded).

    ``kind="adam"``: IFVD/CWD/CIRKD, Adam(lr, betas), no weight decay. ``kind="sgd"``: SKD, SGD(lr,
    momentum, weight_decay = G's) (specs/ifvd_skd.md §C.8).
    """
    if kind == "adam":
        return make_adam(discriminator.parameters(), lr, betas=betas, weight_decay=weight_decay)
    if kind == "sgd":
        return make_sgd(discriminator.parameters(), lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"build_d_optimizer: kind must be 'adam' or 'sgd', got {kind!r}")


def adversary_builder(ctx, method, p):
    """None without adversarial weights, else a function building the :class:`Adversary` of ``p``."""
    if not (p.adv or p.d):
        return None
    check_adversary_input(ctx, method)
    if p.d_preprocess not in (1, 2, 3):
        raise ValueError(f"d_preprocess must be 1 (bn), 2 (tanh) or 3 (x/255), got {p.d_preprocess}")

    def build():
        disc = Discriminator(p.d_preprocess, 65, p.d_conv_dim, ctx.num_classes, norm_layer=bn_layer(ctx))
        disc = disc.to(ctx.device)
        optimizer = build_d_optimizer(disc, p.d_optimizer, lr=p.d_lr, momentum=p.d_momentum,
                                      weight_decay=p.d_weight_decay)
        return Adversary(disc, optimizer, p.d_lr, adversarial, adv_type=p.adv_type, lambda_adv=p.adv, lambda_d=p.d,
                         lambda_gp=p.gp, order=p.d_order, poly=p.d_poly)

    return build
