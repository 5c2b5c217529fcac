"""The compiled InPlace-ABN (specs/inplace_abn.md §6): gradcheck, parity with BatchNorm + activation, the in-place
contract, numerics, bad inputs, saved memory. Needs `make build-abn` (which `make test` runs first)."""
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from common.abn import ABN, InPlaceABN, InPlaceABNSync, extension_available, inplace_abn, norm_layer
from common.errors import UserError


@pytest.fixture(autouse=True)
def _require_extension():
    if not extension_available():
        pytest.fail("the InPlace-ABN extension is not built: run `make build-abn` before these tests")


ACTS = [("leaky_relu", 0.01), ("leaky_relu", 0.1), ("elu", 1.0), ("elu", 0.5), ("identity", 0.01)]


def act_fn(name, param):
    return {"leaky_relu": lambda t: F.leaky_relu(t, param), "elu": lambda t: F.elu(t, param),
            "identity": lambda t: t}[name]


def signed_weight(c, dtype, zero=False):
    w = (torch.rand(c, dtype=dtype) + 0.1) * torch.where(torch.arange(c) % 2 == 0, 1.0, -1.0).to(dtype)
    if zero:
        w[0] = 0
    return w


def reference(x, w, b, rm, rv, training, momentum, eps, act, param):
    """nn.functional BN with weight |w|+eps, then the activation; returns y and a closure for the grads."""
    xr = x.detach().clone().requires_grad_()
    gamma = (w.abs() + eps).detach().requires_grad_() if w is not None else None
    beta = b.detach().clone().requires_grad_() if b is not None else None
    y = act_fn(act, param)(F.batch_norm(xr, rm, rv, gamma, beta, training, momentum, eps))

    def grads(g):
        y.backward(g)
        dw = None if w is None else torch.where(w < 0, -gamma.grad, gamma.grad)  # sign(0) = +1 (§1.7)
        return xr.grad, dw, None if b is None else beta.grad

    return y.detach(), grads


@pytest.mark.parametrize("act,param", ACTS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(act, param, training, affine):
    torch.manual_seed(0)
    others = [(6, 3), (3, 2, 5), (2, 2, 2, 2, 2)]
    for shape in [(2, 3, 2, 3), others[(ACTS.index((act, param)) + training + 2 * affine) % 3]]:
        c = shape[1]
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        w = signed_weight(c, torch.float64).requires_grad_(affine) if affine else None
        b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine else None
        rm, rv = (None, None) if training else (torch.randn(c, dtype=torch.float64),
                                                torch.rand(c, dtype=torch.float64) + 0.5)

        def fn(x, w, b, rm=rm, rv=rv):
            return inplace_abn(x.clone(), w, b, rm, rv, training, 0.1, 1e-5, act, param)

        assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-5)


def test_double_backward_is_a_clear_error():
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    y = inplace_abn(x.clone(), w, torch.zeros(3, dtype=torch.float64), None, None)
    (gx,) = torch.autograd.grad(y.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|double backward|differentiable"):
        gx.sum().backward()


CASES = [
    # (shape, channels_last)
    ((8, 5), False),
    ((4, 6, 5, 7), False),
    ((4, 6, 5, 7), True),
    ((3, 20, 1, 1), False),
    ((2, 3, 4, 2, 3), True),
]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("shape,channels_last", CASES)
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.01)])
def test_parity_with_batchnorm_and_activation(dtype, tol, shape, channels_last, act, param):
    torch.manual_seed(1)
    c = shape[1]
    fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
    w = signed_weight(c, dtype, zero=True)
    b = torch.randn(c, dtype=dtype)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    for step in range(3):
        training = step < 2
        x = torch.randn(shape, dtype=dtype) * 2 + 0.5
        if channels_last:
            x = x.contiguous(memory_format=fmt)
        g = torch.randn(shape, dtype=dtype)
        y_ref, grads = reference(x, w, b, rm_ref, rv_ref, training, 0.1, 1e-5, act, param)
        dx_ref, dw_ref, db_ref = grads(g)
        xi = x.clone().requires_grad_(False)
        wi, bi = w.clone().requires_grad_(), b.clone().requires_grad_()
        xin = xi.clone().requires_grad_()
        z = inplace_abn(xin * 1, wi, bi, rm, rv, training, 0.1, 1e-5, act, param)
        z.backward(g)
        torch.testing.assert_close(z, y_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(xin.grad, dx_ref, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(bi.grad, db_ref, rtol=tol, atol=tol * 10)
        torch.testing.assert_close(wi.grad[1:], dw_ref[1:], rtol=tol, atol=tol * 10)
        # w = 0: xhat is recovered as (y - b) / eps, so float32 rounding of y is amplified 1e5 times (§1.7).
        zero_tol = 1e-6 if dtype == torch.float64 else 2e-2
        assert wi.grad[0].item() == pytest.approx(dw_ref[0].item(), rel=zero_tol, abs=zero_tol)
        torch.testing.assert_close(rm, rm_ref, rtol=tol, atol=tol)
        torch.testing.assert_close(rv, rv_ref, rtol=tol, atol=tol)
        if channels_last:
            assert z.is_contiguous(memory_format=fmt) and xin.grad.is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("cls", [InPlaceABN, InPlaceABNSync])
def test_module_matches_abn_reference(momentum, cls):
    torch.manual_seed(2)
    ref = ABN(6, momentum=momentum)
    mod = cls(6, momentum=momentum)
    with torch.no_grad():
        ref.weight.copy_(signed_weight(6, torch.float32))
        ref.bias.normal_()
    mod.load_state_dict(ref.state_dict(), strict=True)
    for step in range(4):
        for m in (ref, mod):
            m.train(step < 3)
        x = torch.randn(4, 6, 3, 3)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ref(xa * 1), mod(xb * 1)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(mod.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mod.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(mod.running_mean, ref.running_mean)
        torch.testing.assert_close(mod.running_var, ref.running_var)
    assert sorted(mod.state_dict()) == ["bias", "running_mean", "running_var", "weight"]


def test_inplace_contract():
    torch.manual_seed(3)
    w = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=True)
    src = torch.randn(3, 4, 5, 5, requires_grad=True)
    x = src * 1
    ptr, version = x.data_ptr(), x._version
    y = inplace_abn(x, w, b, None, None)
    assert y is x and y.data_ptr() == ptr and x._version > version
    saved = y.detach().clone()
    g = torch.randn_like(y)
    g_before = g.clone()
    y.backward(g, retain_graph=True)
    first = (src.grad.clone(), w.grad.clone(), b.grad.clone())
    assert torch.equal(g, g_before), "backward wrote into the incoming gradient"
    assert torch.equal(y.detach(), saved), "backward wrote into the saved output"
    for t in (src, w, b):
        t.grad = None
    y.backward(g)
    for got, want in zip((src.grad, w.grad, b.grad), first):
        assert torch.equal(got, want)


def test_leaf_and_modified_output_errors():
    w, b = torch.ones(3), torch.zeros(3)
    leaf = torch.randn(4, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        inplace_abn(leaf, w, b, None, None)
    src = torch.randn(4, 3, requires_grad=True)
    y = inplace_abn(src * 1, w, b, None, None)
    y.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_shared_and_expanded_gradients_match_reference():
    torch.manual_seed(4)
    a, c = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    w, b = signed_weight(3, torch.float32), torch.randn(3)
    pa, pc = a.clone().requires_grad_(), c.clone().requires_grad_()
    (inplace_abn(pa * 1, w, b, None, None) + inplace_abn(pc * 1, w, b, None, None)).sum().backward()
    for inp, got in ((a, pa.grad), (c, pc.grad)):
        _, grads = reference(inp, w, b, None, None, True, 0.1, 1e-5, "leaky_relu", 0.01)
        torch.testing.assert_close(got, grads(torch.ones_like(inp))[0], rtol=1e-4, atol=1e-5)


def test_zero_weight_moves_under_sgd():
    torch.manual_seed(5)
    mod = InPlaceABN(3, activation="identity")
    with torch.no_grad():
        mod.weight.zero_()
    x = torch.randn(8, 3, 4, 4)
    y = mod(x.clone())
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert torch.isfinite(mod.weight.grad).all() and (mod.weight.grad != 0).all()
    with torch.no_grad():
        mod.weight -= 0.1 * mod.weight.grad
    assert (mod.weight != 0).all()


def test_elu_saturation_gives_finite_gradients():
    torch.manual_seed(6)
    x = torch.randn(1, 2, 2000)
    x[0, 0, 0] = -45 * x[0, 0].std() + x[0, 0].mean()
    w, b = torch.ones(2, requires_grad=True), torch.zeros(2, requires_grad=True)
    src = x.clone().requires_grad_()
    y = inplace_abn(src * 1, w, b, None, None, activation="elu", activation_param=1.0)
    assert y[0, 0, 0].item() == -1.0
    y.backward(torch.randn_like(y))
    for t in (src.grad, w.grad, b.grad):
        assert torch.isfinite(t).all()


def test_large_channel_statistics_float32():
    torch.manual_seed(7)
    x = torch.randn(1, 2, 1 << 20) * 3 + 100
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    xd = x.double()
    mean, var = xd.mean((0, 2)), xd.var((0, 2), unbiased=False)
    from common.abn import _backend
    m, v, cnt = _backend.for_tensor(x).statistics(x)
    assert cnt.item() == 1 << 20
    torch.testing.assert_close(m.double(), mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(v.double(), var, rtol=1e-5, atol=0)
    del rm, rv


BAD = [
    ("ndim", lambda: inplace_abn(torch.randn(5), torch.ones(5), torch.zeros(5), None, None), "at least 2"),
    ("transposed", lambda: inplace_abn(torch.randn(3, 4, 5, 6).transpose(2, 3), torch.ones(4), torch.zeros(4),
                                       None, None), "contiguous or channels_last"),
    ("channels", lambda: inplace_abn(torch.randn(3, 4, 5), torch.ones(3), torch.zeros(3), None, None),
     "weight must have shape \\[4\\]"),
    ("running", lambda: inplace_abn(torch.randn(3, 4, 5), torch.ones(4), torch.zeros(4), torch.zeros(3),
                                    torch.ones(3), False), "mean must have shape \\[4\\]"),
    ("one value", lambda: inplace_abn(torch.randn(1, 4), torch.ones(4), torch.zeros(4), None, None),
     "more than 1 value per channel"),
    ("activation", lambda: inplace_abn(torch.randn(3, 4), torch.ones(4), torch.zeros(4), None, None,
                                       activation="relu"), "unknown activation 'relu'"),
    ("slope", lambda: inplace_abn(torch.randn(3, 4), None, None, None, None, activation_param=0.0), "> 0"),
    ("weight only", lambda: inplace_abn(torch.randn(3, 4), torch.ones(4), None, None, None), "together"),
    ("dtype", lambda: inplace_abn(torch.randn(3, 4, dtype=torch.float64), torch.ones(4), torch.zeros(4),
                                  None, None), "weight must be Double"),
    ("integer", lambda: inplace_abn(torch.ones(3, 4, dtype=torch.long), None, None, None, None), "float32"),
    ("half on cpu", lambda: inplace_abn(torch.randn(3, 4).half(), None, None, None, None), "float32"),
]


@pytest.mark.parametrize("name,call,message", BAD, ids=[b[0] for b in BAD])
def test_bad_inputs_raise_one_clear_error(name, call, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        call()


def test_module_rejects_unknown_activation():
    with pytest.raises(UserError, match="unknown activation 'relu'"):
        InPlaceABN(4, activation="relu")


def _saved_bytes(model, x):
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return sum(seen.values())


def test_saved_memory_of_a_conv_stack_is_about_half():
    torch.manual_seed(8)

    def stack(norm):
        layers = []
        for _ in range(20):
            layers += [nn.Conv2d(8, 8, 3, padding=1, bias=False)] + norm()
        return nn.Sequential(*layers)

    bn = stack(lambda: [nn.BatchNorm2d(8), nn.LeakyReLU(0.01, inplace=True)])
    iabn = stack(lambda: [InPlaceABN(8)])
    x = torch.randn(4, 8, 32, 32)
    ratio = _saved_bytes(iabn, x) / _saved_bytes(bn, x)
    assert ratio < 0.55, ratio


def test_models_with_and_without_extension_agree():
    torch.manual_seed(9)

    def block(norm):
        cls = norm_layer(norm)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), cls(8, activation="identity"), nn.ReLU(),
                             nn.Conv2d(8, 8, 1), cls(8))

    assert norm_layer("inplace_abn") is InPlaceABNSync and norm_layer("auto") is InPlaceABNSync
    a, b = block("inplace_abn"), block("bn")
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 9, 9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        ya = a(x)
    torch.testing.assert_close(ya, b(x), rtol=1e-5, atol=1e-5)
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=1e-5, atol=1e-5)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4), (torch.float16, 2e-2),
                                       (torch.bfloat16, 5e-2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("act,param", [("leaky_relu", 0.01), ("elu", 1.0), ("identity", 0.01)])
def test_cuda_matches_cpu(dtype, tol, channels_last, act, param):
    torch.manual_seed(10)
    pdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(4, 6, 5, 7, dtype=torch.float64) * 2 + 0.5
    g = torch.randn_like(x)
    w, b = signed_weight(6, pdtype), torch.randn(6, dtype=pdtype)
    results = []
    for device, xdtype in (("cpu", pdtype), ("cuda", dtype)):
        xs = x.to(device, xdtype)
        if channels_last:
            xs = xs.contiguous(memory_format=torch.channels_last)
        src = xs.clone().requires_grad_()
        wd, bd = w.to(device).requires_grad_(), b.to(device).requires_grad_()
        rm, rv = torch.zeros(6, dtype=pdtype, device=device), torch.ones(6, dtype=pdtype, device=device)
        y = inplace_abn(src * 1, wd, bd, rm, rv, True, 0.1, 1e-5, act, param)
        y.backward(g.to(device, xdtype))
        results.append([t.detach().double().cpu() for t in (y, src.grad, wd.grad, bd.grad, rm, rv)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol * 10)


@cuda
def test_cuda_device_guard_on_second_device():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x = torch.randn(4, 3, 5, device="cuda:1")
    y = inplace_abn(x.clone(), torch.ones(3, device="cuda:1"), torch.zeros(3, device="cuda:1"), None, None)
    torch.testing.assert_close(y.cpu(), inplace_abn(x.cpu(), torch.ones(3), torch.zeros(3), None, None),
                               rtol=1e-4, atol=1e-5)


def test_pspnet_with_and_without_extension_give_the_same_outputs():
    from common.models import build_model

    torch.manual_seed(11)
    a = build_model("pspnet_resnet18", num_classes=19, norm="inplace_abn")
    b = build_model("pspnet_resnet18", num_classes=19, norm="bn")
    assert isinstance(a.dsn[1], InPlaceABNSync) and type(b.dsn[1]) is ABN
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 65, 65)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for training in (True, False):
            a.train(training), b.train(training)
            torch.manual_seed(12)
            out_a = a(x)
            torch.manual_seed(12)
            out_b = b(x)
            for got, want in zip(out_a, out_b):
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    for key, value in b.state_dict().items():  # running statistics after the training step
        torch.testing.assert_close(a.state_dict()[key], value, rtol=1e-4, atol=1e-5)
