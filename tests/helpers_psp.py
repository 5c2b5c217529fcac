"""Helpers of the PSP-lineage entry-point tests (IFVD, SKD journal code): stand-in networks, batches, the
reference G and D steps of the originals' ``NetModel``, runners."""
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.losses.adversarial import gradient_penalty
from common.losses.segmentation import CriterionDSN


class StubSeg(nn.Module):
    """A tiny stand-in for PSPNet at stride 8 without dropout or BN (deterministic).

    Outputs ``[logits, aux, feat]``; with ``skd_outputs`` SKD's seven ``[logits, dsn, psp_feat, x4, x3, x2, x1]``.
    """

    def __init__(self, channels, skd_outputs=False):
        super().__init__()
        self.feat = nn.Conv2d(3, channels, 1)
        self.head = nn.Conv2d(channels, 19, 1)
        self.aux = nn.Conv2d(channels, 19, 1)
        self.x4 = nn.Conv2d(channels, 2 * channels, 1) if skd_outputs else None
        skd_names = ("layer4", "layer3", "layer2", "layer1") if skd_outputs else ()
        self.output_names = ("logits", "aux", "feat") + skd_names

    def forward(self, x):
        feat = torch.relu(self.feat(F.avg_pool2d(x, 8)))
        outputs = [self.head(feat), self.aux(feat), feat]
        if self.x4 is not None:
            x4 = self.x4(feat)
            outputs += [x4, x4 + 1, x4 + 2, F.avg_pool2d(x, 4)]
        return outputs


def stub_batch(seed=0, side=520):
    """Two random images and labels in 40x40 blocks of 19 classes, the top 60 rows ignored (255)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(2, 3, side, side, generator=g)
    labels = torch.randint(0, 19, (2, side // 40, side // 40), generator=g)
    labels = labels.repeat_interleave(40, 1).repeat_interleave(40, 2)
    labels[:, :60] = 255
    return images, labels.float()


def backbone_only(state):
    """The deep-stem backbone entries of a PSPNet state_dict (a stand-in ImageNet file)."""
    return {k: v for k, v in state.items() if k.startswith(("conv", "bn", "layer"))}


def run_main(fn, argv, capsys):
    """Call an entry point's ``main(argv)`` expecting a clean failure: exit 2, ``error: …``, no traceback."""
    with pytest.raises(SystemExit) as exc:
        fn(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


def script_env(**extra):
    """The environment of a subprocess run of a script: no PYTHONPATH (the scripts find the repo), ``$PYTHON``."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHON"] = sys.executable
    env.update(extra)
    return env


def reference_forward(s_ref, teacher, images, labels):
    """The reference forwards of one step: int64 labels, teacher under no_grad, the student copy with
    gradients, and the task loss CE + 0.4·aux (``CriterionDSN``)."""
    y = labels.long()
    with torch.no_grad():
        preds_t = teacher(images)
    preds_s = s_ref(images)
    return y, preds_s, preds_t, CriterionDSN()(preds_s, y)


def check_g_step(out, expected, student, s_ref, total):
    """The step's logged G losses equal the ``(name, tensor)`` pairs of ``expected``, and one reference SGD step
    (lr 0.01, momentum 0.9, weight decay 5e-4) of ``s_ref`` on ``total`` gives the student's weights."""
    for name, value in expected:
        assert out[name] == pytest.approx(value.item(), rel=1e-5, abs=1e-7), name
    sgd = torch.optim.SGD(s_ref.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sgd.zero_grad()
    total.backward()
    sgd.step()
    for p, q in zip(student.parameters(), s_ref.parameters()):
        torch.testing.assert_close(p, q)


def check_d_step(out, disc, d_ref, d_optimizer, preds_s, preds_t, seed, student_first):
    """One reference D step on the detached pre-update logits, 0.1·(mean D(S) − mean D(T)) + 0.1·10·GP (the GP
    interpolation drawn after ``torch.manual_seed(seed)``), matches the step's loss_D and D's new weights. D is
    called on the student first (IFVD, CWD) or on the teacher first (SKD): its spectral-norm power iteration
    makes the order matter."""
    d_optimizer.zero_grad()
    real, fake = preds_t[0].detach(), preds_s[0].detach()
    if student_first:
        d_s, d_t = d_ref(fake)[0], d_ref(real)[0]
    else:
        d_t, d_s = d_ref(real)[0], d_ref(fake)[0]
    torch.manual_seed(seed)
    d_loss = 0.1 * (d_s.mean() - d_t.mean()) + 0.1 * 10 * gradient_penalty(d_ref, real, fake)
    assert out["loss_D"] == pytest.approx(d_loss.item(), rel=1e-5, abs=1e-7)
    d_loss.backward()
    d_optimizer.step()
    for (name, p), q in zip(disc.named_parameters(), d_ref.parameters()):
        torch.testing.assert_close(p, q, msg=name)
