"""Test helpers: a tiny UNet, and rounding-error bounds derived from the computation.

A float tolerance in these tests is never a number read off one machine's output. It is

- u = ``unit_roundoff(dtype)`` = eps/2 (2⁻²⁴ for float32, 2⁻⁵³ for float64);
- times a length: ``RoundingChain`` watches a computation and counts N, the longest chain of
  rounded operations behind a result (a sum of m terms counts m, a matrix product or a
  convolution its fan-in, an elementary function 4, an elementwise operation 1, a copy or a
  view 0), through the whole forward solve and its backward pass;
- turned into a relative bound by ``roundoff_bound``: the worst case γ_N = N u / (1 − N u)
  (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed., Lemma 3.1) or, where
  that is too loose to ever catch a wrong gradient (a network's chain of 10⁵ operations), the
  probabilistic γ̃_N = exp(λ √N u + N u²/(1 − u)) − 1 of Higham & Mary (SIAM J. Sci. Comput.
  41, 2019, Thm 2.4 and 3.1), which holds but with probability 2N exp(−λ²(1 − u)²/2) ≤ 1e-9;
- two results of the same exact quantity then differ by at most the sum (``pair_bound``).

Such a bound is relative to the result: it takes the condition number of the computation as
1. The digits mixture's is larger (its softmax sees logits of magnitude ≈ 40, whose absolute
rounding errors it turns into relative ones), which γ_N, linear in N where rounding errors
accumulate like √N, absorbs. A wrong gradient is off by 1e-2 or more relative; every bound
built here stays far below that.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from sagkit.core.models import GaussianMixture
from sagkit.core.schedules import FlowSchedule, VPSchedule, time_grid

__all__ = [
    "exit_code",
    "one_line_error",
    "write_style_image",
    "tiny_unet",
    "F64_AGREE",
    "one_gaussian",
    "exact_flow",
    "make_loss",
    "grid",
    "noise",
    "unit_roundoff",
    "gamma",
    "gamma_tilde",
    "roundoff_bound",
    "pair_bound",
    "RoundingChain",
    "rel",
    "WRONG_GRADIENT",
]

WRONG_GRADIENT = 1e-2  # the relative error of a wrong gradient (a missed term, a sign): ≥ 1e-2


def tiny_unet(channels=(8, 16), sample_size=8, seed=0, **config):
    """A randomly initialised diffusers UNet2DModel small enough for CPU tests."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        layers_per_block=1,
        down_block_types=("DownBlock2D",) * len(channels),
        up_block_types=("UpBlock2D",) * len(channels),
        norm_num_groups=4,
        **config,
    )


def rel(a, b) -> float:
    """‖a − b‖ / ‖b‖ in float64; tuples (parameters) are concatenated first."""
    if isinstance(a, tuple):
        a = torch.cat([t.flatten() for t in a])
        b = torch.cat([t.flatten() for t in b])
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps / 2: the largest relative error of one correctly rounded operation."""
    return torch.finfo(dtype).eps / 2


def gamma(n: int, dtype: torch.dtype) -> float:
    """γ_n = n u / (1 − n u), the worst-case relative error of a chain of n rounded operations."""
    nu = n * unit_roundoff(dtype)
    if not nu < 1:
        raise ValueError(f"n u = {nu} ≥ 1: no bound for a chain of {n} operations")
    return nu / (1 - nu)


def gamma_tilde(n: int, dtype: torch.dtype, failure: float = 1e-9) -> float:
    """γ̃_n(λ) = exp(λ √n u + n u² / (1 − u)) − 1 (Higham & Mary 2019, Thm 2.4), λ chosen so
    that the bound fails with probability at most ``failure`` for each of the n operations'
    results (a union bound: n · 2 exp(−λ²(1 − u)²/2) ≤ failure)."""
    u = unit_roundoff(dtype)
    lam = math.sqrt(2 * math.log(2 * n / failure)) / (1 - u)
    return math.expm1(lam * math.sqrt(n) * u + n * u * u / (1 - u))


def roundoff_bound(n: int, dtype: torch.dtype) -> float:
    """The relative error bound of a ``dtype`` result at the end of a chain of n roundings.

    γ_n (the worst case) where it can still tell a wrong gradient, that is where two of them
    add up to at most a tenth of ``WRONG_GRADIENT``; otherwise (a network's chain runs to 10⁵
    operations and more, where γ_n nears 1e-2) the probabilistic γ̃_n of Higham & Mary.
    """
    worst = gamma(n, dtype) if n * unit_roundoff(dtype) < 0.5 else math.inf
    return worst if 2 * worst <= WRONG_GRADIENT / 10 else gamma_tilde(n, dtype)


def pair_bound(bound_a: float, bound_b: float) -> float:
    """A bound on ‖a − b‖/‖b‖ when ‖a − g‖ ≤ bound_a ‖g‖ and ‖b − g‖ ≤ bound_b ‖g‖ (the
    triangle inequality, and ‖b‖ ≥ (1 − bound_b) ‖g‖)."""
    return (bound_a + bound_b) / (1 - bound_b)


# --- the longest chain of rounded operations ---------------------------------------------------

_aten = torch.ops.aten
# Operations that round nothing: views, copies, selection, comparisons, sign and max/min.
_EXACT = {
    _aten.view, _aten._unsafe_view, _aten.reshape, _aten.expand, _aten.permute, _aten.transpose,
    _aten.t, _aten.slice, _aten.select, _aten.squeeze, _aten.unsqueeze, _aten.unbind,
    _aten.split, _aten.split_with_sizes, _aten.chunk, _aten.alias, _aten.detach, _aten.clone,
    _aten.cat, _aten.stack, _aten.lift_fresh, _aten.lift_fresh_copy,
    _aten.contiguous, _aten.as_strided, _aten.index, _aten.index_select, _aten.gather,
    _aten.zeros, _aten.zeros_like, _aten.ones, _aten.ones_like, _aten.empty, _aten.empty_like,
    _aten.full, _aten.full_like, _aten.fill_, _aten.zero_, _aten.new_zeros, _aten.new_empty,
    _aten.arange, _aten.abs, _aten.neg, _aten.clamp, _aten.where, _aten.masked_fill,
    _aten.maximum, _aten.minimum, _aten.max, _aten.amax, _aten.min, _aten.amin, _aten.argmax,
    _aten.eq, _aten.ne, _aten.lt, _aten.le, _aten.gt, _aten.ge, _aten.isnan, _aten.isinf,
    _aten.all, _aten.any, _aten.bitwise_and, _aten.bitwise_or, _aten.logical_not,
    _aten.searchsorted, _aten._local_scalar_dense, _aten.upsample_nearest2d, _aten.flip,
    _aten.constant_pad_nd, _aten.relu, _aten.sign, _aten.randn, _aten.normal_, _aten.random_,
}  # fmt: skip


# Elementary functions: the libraries' vectorised ones are accurate to about 2 ulps (4 u), and
# the composite activations add a division and a product or two.
_ELEMENTARY = {
    _aten.exp, _aten.expm1, _aten.log, _aten.log1p, _aten.log2, _aten.sin, _aten.cos,
    _aten.tan, _aten.tanh, _aten.acos, _aten.asin, _aten.atan, _aten.atan2, _aten.sinh,
    _aten.cosh, _aten.erf, _aten.erfc, _aten.pow, _aten.rsqrt,
}  # fmt: skip
_ACTIVATIONS = {
    _aten.sigmoid, _aten.silu, _aten.gelu, _aten.softplus, _aten.mish, _aten.sigmoid_backward,
    _aten.silu_backward, _aten.gelu_backward, _aten.softplus_backward, _aten.tanh_backward,
}  # fmt: skip


def _numel(t) -> int:
    return t.numel() if isinstance(t, torch.Tensor) else 1


def _cost(func, args, out_tensors) -> int:
    """How many rounded operations ``func`` adds to the longest chain through each output."""
    packet = func.overloadpacket
    if packet in _EXACT:
        return 0
    if packet in (_aten._to_copy, _aten.copy_):  # rounds only when it narrows a float dtype
        src = (args[1] if packet is _aten.copy_ else args[0]).dtype
        dst = out_tensors[0].dtype
        narrows = dst.is_floating_point and src.is_floating_point
        return int(narrows and torch.finfo(dst).eps > torch.finfo(src).eps)
    if packet in _ELEMENTARY:
        return 4
    if packet in _ACTIVATIONS:
        return 8
    if packet in (_aten.mm, _aten.bmm, _aten.matmul):
        return args[0].shape[-1]
    if packet in (_aten.addmm, _aten.baddbmm):
        return args[1].shape[-1] + 2
    if packet is _aten.convolution:  # (input, weight, bias, ...): a dot product of the fan-in
        return math.prod(args[1].shape[1:]) + 1
    if packet is _aten.convolution_backward:  # (grad_out, input, weight, ...)
        grad_out, weight = args[0], args[2]
        kernel = math.prod(weight.shape[2:])
        positions = grad_out.numel() // grad_out.shape[1]  # ∂weight, ∂bias: over B × H × W
        return max(weight.shape[0] * kernel, positions)  # ∂input: over out-channels × kernel
    if packet in (_aten._softmax, _aten._log_softmax):  # max (exact), −, exp, Σ, ÷ or log
        return args[0].shape[args[1]] + 6
    if packet in (_aten._softmax_backward_data, _aten._log_softmax_backward_data):
        return args[0].shape[args[2]] + 6
    if packet in (_aten.native_group_norm, _aten.native_group_norm_backward):
        forward = packet is _aten.native_group_norm
        x, groups = (args[0], args[6]) if forward else (args[1], args[8])
        group = x.numel() // (x.shape[0] * groups)  # C/G channels × H × W
        batch_positions = x.numel() // x.shape[1]  # ∂weight, ∂bias: over B × H × W
        return 2 * max(group, batch_positions) + 8  # mean, then variance about it, then affine
    if packet in (_aten.native_layer_norm, _aten.native_layer_norm_backward):
        x = args[0] if packet is _aten.native_layer_norm else args[1]
        normalized = math.prod(args[1] if packet is _aten.native_layer_norm else args[2])
        return 2 * max(normalized, x.numel() // normalized) + 8
    if "attention" in packet.__name__:  # q kᵀ over E, softmax and · v over L tokens
        q, k = args[:2] if "backward" not in packet.__name__ else args[1:3]
        return 2 * (q.shape[-1] + 2 * k.shape[-2] + 8)  # the backward repeats the forward
    if "upsample" in packet.__name__ and "backward" in packet.__name__:
        return max(1, _numel(args[0]) // max(1, out_tensors[0].numel()))
    if packet in (_aten.cumsum, _aten.cumprod):  # a running sum or product along dim
        return args[0].shape[args[1]] if args[0].ndim else 1
    # Anything else is elementwise (1 rounding), or a reduction over numel(in)/numel(out) terms
    # (a mean adds a division, a norm a square and a root, a variance its own mean first).
    tensors = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
    terms = max(1, max(map(_numel, tensors), default=1) // max(1, min(map(_numel, out_tensors))))
    if packet in (_aten.var, _aten.std, _aten.var_mean, _aten.std_mean):
        return 2 * terms + 3
    if packet in (_aten.linalg_vector_norm, _aten.norm):
        return terms + 2
    return terms + (packet is _aten.mean)


class RoundingChain(TorchDispatchMode):
    """Counts, for every tensor computed inside it, the longest chain of rounded operations
    that produced it (tensors made outside count 0). ``longest(result)`` reads it back.

    Storage is the key (views share their base's chain); every result is kept alive until the
    mode closes, so that no address is reused for another tensor meanwhile. The arithmetic is
    the very aten call the computation makes, so the values are those of a run without it.
    """

    def __init__(self):
        super().__init__()
        self._chain: dict[int, int] = {}
        self._alive: list = []

    def _key(self, t: torch.Tensor):
        storage = t.untyped_storage()
        return storage.data_ptr() if storage.nbytes() else None

    def _of(self, t) -> int:
        if not isinstance(t, torch.Tensor):
            return 0
        key = self._key(t)
        return self._chain.get(key, 0) if key is not None else 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if outs:
            inputs = tree_flatten((args, kwargs))[0]
            depth = max((self._of(a) for a in inputs), default=0) + _cost(func, args, outs)
            for t in outs:
                key = self._key(t)
                if key is not None:
                    self._chain[key] = depth
                    self._alive.append(t.untyped_storage())
        return out

    def longest(self, result) -> int:
        """The longest chain behind any tensor in ``result`` (a tensor or nested tuples)."""
        return max((self._of(t) for t in tree_flatten(result)[0]), default=0)

    def __exit__(self, *exc):
        out = super().__exit__(*exc)
        self._alive.clear()
        return out


# --- the small problems of the gradient tests ----------------------------------------------

# float64 engines that must agree: 1e-10 ≫ γ_N(float64) = N · 1.1e-16 for the N < 10⁴ roundings
# of these mixture solves (forward and backward), and ≪ the 1e-2 of a wrong gradient.
F64_AGREE = 1e-10


def make_loss(seed=1):
    """L(x) = Σ_b [½‖x_b − target_b‖² + (sin x_b)·w] — nonlinear, per sample (B,) values."""
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(x):
        target = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x)
        w = torch.randn(x.shape[1:], generator=gen.manual_seed(seed + 1)).to(x)
        return 0.5 * (x - target).flatten(1).pow(2).sum(1) + (torch.sin(x) * w).flatten(1).sum(1)

    return loss_fn


def grid(model, n=4, t_start=0.8):
    return time_grid(model.schedule, t_start, model.schedule.t_min, n)


def noise(model_or_shape, batch=2, dtype=torch.float64, seed=0):
    shape = model_or_shape
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, *shape), generator=gen, dtype=torch.float64).to(dtype)


def one_gaussian(schedule):
    """One Gaussian N(μ, 0.5² I) on 2×2 images (float64), for closed-form flows."""
    mu = torch.tensor([[[0.7, -1.2], [0.4, 2.0]]], dtype=torch.float64)[:, None]
    return GaussianMixture(mu, 0.5, schedule)


def exact_flow(model, x_t, t, s):
    """x_s = α_s μ + sqrt(v_s / v_t)(x_t − α_t μ) for one Gaussian (docs/maths.md §4.3)."""
    sch, mu = model.schedule, model.means[0]

    def v(u):
        return sch.alpha(u) ** 2 * model.std**2 + sch.sigma(u) ** 2

    return sch.alpha(s) * mu + math.sqrt(v(s) / v(t)) * (x_t - sch.alpha(t) * mu)


# --- command lines ---------------------------------------------------------------------------


def exit_code(main, argv) -> int:
    """``main(argv)``'s return value, or the code of the ``SystemExit`` it raised."""
    try:
        return main(argv)
    except SystemExit as exit_:
        return exit_.code


def one_line_error(capsys) -> str:
    """The one non-blank line a command wrote to stderr (no traceback), checked and returned."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    return lines[0]


def write_style_image(path):
    """A random 20×24 RGB PNG at ``path`` (seeded), the style image of the command-line tests;
    returns the path."""
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def top_time(schedule) -> float:
    """The latest start of a test grid at which α > 0: 1 for a VP schedule, 0.999 for a flow
    schedule (α_1 = 0 there: the ε and SDE frames and a grid uniform in λ need α > 0)."""
    return 1.0 if schedule.alpha(1.0) > 0 else 0.999


SCHEDULES = {"vp": VPSchedule.linear(), "flow": FlowSchedule.rectified(shift=3.0)}
"""The two kinds of schedule the exactness tests of the mixture run under: the linear VP
schedule, and the rectified flow with SD3's shift s = 3."""

BOTH_SCHEDULES = pytest.mark.parametrize("mixture", list(SCHEDULES), indirect=True)
"""Runs a test of the ``mixture`` fixture (VP by default) under the flow schedule too: for the
tests whose code the flow changes (the velocity frame of the ODE, the t = 1 endpoint)."""


def mixture_under(schedule):
    """The 3-component test mixture on 2×2 images, float64, under ``schedule``."""
    means = torch.tensor(
        [[[1.0, -0.5], [0.3, 0.8]], [[-1.0, 0.2], [0.5, -0.7]], [[0.0, 0.9], [-0.8, 0.1]]]
    )
    return GaussianMixture(means[:, None].double(), 0.3, schedule, weights=[0.5, 0.3, 0.2])


PROMPTS = ["a red fox", "a lighthouse"]
"""The two prompts of the pipeline tests."""


def seeded(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def load_benchmark(name: str):
    """The module of ``benchmarks/<name>.py`` (the scripts are no package), loaded afresh."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
