"""The CPU fast paths against plain torch in float64: oneDNN GEMMs (forward and gradients) and glibc's kept heap."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from raymoe.kernels.onednn_gemm import linear, mm_nt, uses_onednn

needs_onednn = pytest.mark.skipif(not uses_onednn(torch.zeros(1)), reason="torch without oneDNN on this CPU")


@needs_onednn
@pytest.mark.parametrize("transposed_input", [False, True])
def test_linear_matches_float64_forward_and_gradients(transposed_input):
    torch.manual_seed(0)
    x = torch.randn(300, 77) if not transposed_input else torch.randn(77, 300).t()  # strided input as well
    w, b, g = torch.randn(40, 77), torch.randn(40), torch.randn(300, 40)
    x.requires_grad_(True), w.requires_grad_(True), b.requires_grad_(True)
    y = linear(x, w, b)
    assert y.grad_fn is not None and "Linear" in type(y.grad_fn).__name__ and "Addmm" not in type(y.grad_fn).__name__
    (y * g).sum().backward()
    x64, w64, b64 = (t.detach().double().requires_grad_(True) for t in (x, w, b))
    y64 = F.linear(x64, w64, b64)
    (y64 * g.double()).sum().backward()
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-4)
    for got, want in ((x.grad, x64.grad), (w.grad, w64.grad), (b.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)


@needs_onednn
def test_linear_without_bias_and_with_frozen_weight():
    torch.manual_seed(1)
    x, w = torch.randn(5, 6, requires_grad=True), torch.randn(3, 6)
    linear(x, w).sum().backward()
    torch.testing.assert_close(x.grad, w.sum(0).expand(5, 6))


@pytest.mark.parametrize("inner", [0, 1, 9, 346_112])  # empty (oneDNN refuses it), tiny, the first conv's M
def test_mm_nt_equals_the_plain_product(inner):
    torch.manual_seed(2)
    a, b = torch.randn(10, inner), torch.randn(8, inner)
    want = a.double() @ b.double().t()
    torch.testing.assert_close(mm_nt(a, b).double(), want, rtol=1e-5, atol=1e-3 if inner > 1000 else 1e-5)
    torch.testing.assert_close(mm_nt(a, a).double(), a.double() @ a.double().t(), rtol=1e-5,
                               atol=1e-3 if inner > 1000 else 1e-5)  # the Gram matrix of fast_conv


def test_other_dtypes_and_3d_input_take_the_plain_path():
    x, w = torch.randn(2, 4, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    assert not uses_onednn(x)
    torch.testing.assert_close(linear(x, w), F.linear(x, w))
    x3 = torch.randn(2, 4, 3, requires_grad=True)
    y3 = linear(x3, w.float())
    assert "_Linear" not in type(y3.grad_fn).__name__  # 3-d input is F.linear's, not the 2-d oneDNN Function's
    torch.testing.assert_close(y3, F.linear(x3, w.float()))


FAULTS_SCRIPT = textwrap.dedent("""
    import ctypes, resource, torch
    from raymoe.runtime import _M_MMAP_THRESHOLD, _M_TRIM_THRESHOLD, keep_freed_memory

    def steady_faults_per_round(rounds=8):
        counts = []
        for _ in range(rounds):
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            live = [torch.ones(5 << 20) for _ in range(4)]  # 4 x 20 MB live at once, then all freed
            del live
            counts.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return max(counts[-3:])  # the heap settles within a few rounds

    # glibc's static defaults (mmap above 128 KiB, trim above 128 KiB free), not its run-dependent adaptive ones
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    assert mallopt(_M_MMAP_THRESHOLD, 128 << 10) == 1 and mallopt(_M_TRIM_THRESHOLD, 128 << 10) == 1
    default = steady_faults_per_round()
    assert keep_freed_memory()
    print(default, steady_faults_per_round())
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_stops_page_faults_on_reallocation():
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, check=True)
    default, kept = map(int, out.stdout.split())
    assert default > 10_000  # 80 MB of fresh 4 KiB pages every round
    assert kept < 100


def test_fast_paths_are_applied_from_outside_without_changing_the_model():
    """apply_fast_paths swaps nn.Linear's class only where the probe chose oneDNN: same parameters and state_dict,
    the same outputs and gradients to float32 rounding, and plain F.linear under autocast."""
    from torch import nn

    from raymoe.kernels.fast_paths import OneDnnLinear, apply_fast_paths, gemm_probe

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))
    reference = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 5))
    reference.load_state_dict(model.state_dict())
    decided = apply_fast_paths(model, torch.device("cpu"))
    probe = gemm_probe(torch.get_num_threads())
    assert probe["backend"] in ("onednn", "torch") and decided["linear"] == probe["backend"]
    assert decided["swapped"] == (2 if probe["backend"] == "onednn" else 0)
    assert sum(isinstance(m, OneDnnLinear) for m in model.modules()) == decided["swapped"]
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(32, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = model(x), reference(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtype, as for any nn.Linear
        assert model(x).dtype == reference(x_ref).dtype == torch.bfloat16
    no_cpu = {"linear": "torch", "conv": "torch", "swapped": 0}
    assert apply_fast_paths(nn.Linear(3, 3), torch.device("meta")) == no_cpu


def test_the_probes_leave_the_global_random_state_alone():
    """apply_fast_paths runs after the model's initial weights are drawn: a probe that reseeded torch's default
    generator would give every seed the same noise and data order afterwards."""
    from torch import nn

    from raymoe.kernels.fast_paths import apply_fast_paths, conv_probe, gemm_probe

    model = nn.Module()  # a linear layer and a one-channel conv stage: both probes run
    model.fc, model.convs = nn.Linear(3, 3), nn.ModuleList([nn.Conv2d(1, 2, 3)])
    gemm_probe.cache_clear(), conv_probe.cache_clear()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    apply_fast_paths(model, torch.device("cpu"))  # runs both probes afresh
    assert torch.equal(torch.get_rng_state(), state)
    assert conv_probe.cache_info().currsize == 1 and gemm_probe.cache_info().currsize == 1


def test_conv_fast_path_is_the_probes_choice_and_keeps_the_paper_model():
    """The one-channel convs are swapped exactly when the conv probe picked the patch GEMM; a paper MoE with the
    swapped modules has the same state_dict keys, outputs and gradients (the dense expert path and the gate's
    conv + BatchNorm)."""
    from raymoe.config.load import load_experiment
    from raymoe.kernels.fast_conv import PatchConv2d, PatchStackedConv2d
    from raymoe.kernels.fast_paths import apply_fast_paths, conv_probe, swap_convs
    from raymoe.models.build import build_model

    cfg = load_experiment(raw={"name": "t", "data": {"name": "fashion_mnist"}, "model": {"num_experts": 3},
                               "gate": {"kind": "attentive"}})
    torch.manual_seed(0)
    model, reference = build_model(cfg, 10, 1, 28), build_model(cfg, 10, 1, 28)
    reference.load_state_dict(model.state_dict())
    decided = apply_fast_paths(model, torch.device("cpu"))
    probe = conv_probe(torch.get_num_threads())
    assert probe["backend"] in ("patch_gemm", "torch") and decided["conv"] == probe["backend"]
    swap_convs(model)  # whatever the probe said: the swapped model must equal the plain one
    assert isinstance(model.gate.trunk.convs[0], PatchConv2d) and isinstance(model.experts.convs[0], PatchStackedConv2d)
    assert model.state_dict().keys() == reference.state_dict().keys()
    x = torch.randn(16, 1, 28, 28)
    out, ref = model(x), reference(x)
    torch.testing.assert_close(out.log_probs_BC, ref.log_probs_BC, rtol=1e-4, atol=1e-5)
    out.log_probs_BC[:, 0].sum().backward()
    ref.log_probs_BC[:, 0].sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)
