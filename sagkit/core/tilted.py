"""Exact guidance on a Gaussian mixture: the tilted target, its diffusion and the guidance score.

Training-free guidance with a loss L on the clean image aims at the *tilted* distribution

    p̃_0(x) = p_0(x) e^{−L(x)} / Z,      Z = E_{p_0}[e^{−L(x_0)}],

whose diffusion has the score ∇ log p̃_t = ∇ log p_t + h_t with the *exact guidance score*

    h_t(x) = ∇_x log E[e^{−L(x_0)} | x_t = x]          (B, ...)

(docs/maths.md §14.1). Every guidance method estimates −h_t by a gradient of L at some estimate
of x_0; on a :class:`~sagkit.GaussianMixture` p_0 = Σ_k π_k N(μ_k, s² I) and the three loss
families below, p̃_0 is again a Gaussian mixture, so h_t is exact at every x and t:

    loss                                    tilted component k                  log weight + c_k
    :class:`QuadraticLoss` ‖A x − y‖²/(2τ²)   N(m_k, Σ), Σ = (I/s² + AᵀA/τ²)⁻¹,   c_k = −‖m_k − μ_k‖²/(2s²)
                                              m_k = Σ(μ_k/s² + Aᵀy/τ²)              − ‖A m_k − y‖²/(2τ²)
                                                                                    + ½ log det(Σ/s²)
    :class:`LinearLoss` ⟨w, x⟩                N(μ_k − s² w, s² I)                  c_k = −⟨w, μ_k⟩ + s²‖w‖²/2
    :class:`ClassLoss` −log E[e^{ℓ_K} | x]    N(μ_k, s² I)                         c_k = ℓ_k

with Z = Σ_k π_k e^{c_k} (docs/maths.md §14.2). The components of a tilt share one covariance
Σ = U diag(d) Uᵀ, which is what :class:`TiltedMixture` holds; diffused to time t each is
N(α_t m_k, U diag(α_t² d + σ_t²) Uᵀ), so its score, posterior mean and density are closed forms
in the rotated coordinates z = Uᵀx (docs/maths.md §14.3). :class:`ExactGuidance` pairs a mixture
with a loss and gives h_t, its shift of the network's prediction in any frame, and
log E[e^{−L} | x_t].

The mixtures compute in float64 (they are ground truth): inputs of another dtype are
converted, and results returned in the input's dtype; their samples are float64. The losses
evaluate in their input's dtype, as the guidance methods differentiate them.
"""

from __future__ import annotations

import math

import torch

from .checks import check_finite, check_scale
from .frames import Frame, ode_frame
from .models import GaussianMixture, time_column

__all__ = [
    "TiltedMixture",
    "QuadraticLoss",
    "LinearLoss",
    "ClassLoss",
    "ExactGuidance",
    "pooling_matrix",
]

_F64 = torch.float64


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1).to(_F64)


class TiltedMixture:
    """Σ_k π_k N(m_k, Σ) with one shared covariance Σ = U diag(d) Uᵀ, diffused by ``schedule``:
    a model of the protocol (``eps``, ``x0``, ``velocity``, ``score``) with exact samples.

    Args:
        means: (K, *shape) component means m_k.
        variances: (D,) the eigenvalues d of Σ, D = prod(shape), all positive.
        log_weights: (K,) log π_k, normalised here.
        schedule: the noise schedule.
        basis: (D, D) the orthonormal eigenvectors U of Σ (columns), or ``None`` for U = I.
        log_normaliser: log Z of the tilt this mixture is (0 for an untilted mixture).

    Built by a loss's :meth:`tilt` (``QuadraticLoss(...).tilt(mixture)``) or, untilted, by
    :meth:`of`. With v_t = α_t² d + σ_t² (D,) and z = Uᵀx, component k at time t has the
    quadratic form q_k = Σ_i (z_i − α_t n_ki)²/v_ti, n_k = Uᵀ m_k (docs/maths.md §14.3).
    """

    def __init__(
        self,
        means: torch.Tensor,
        variances: torch.Tensor,
        log_weights: torch.Tensor,
        schedule,
        *,
        basis: torch.Tensor | None = None,
        log_normaliser: float = 0.0,
    ):
        means = torch.as_tensor(means, dtype=_F64)
        self.event_shape = means.shape[1:]
        flat = means.reshape(means.shape[0], -1)
        self.variances = torch.as_tensor(variances, dtype=_F64)
        if self.variances.shape != (flat.shape[1],) or not bool((self.variances > 0).all()):
            raise ValueError(
                f"variances must be {flat.shape[1]} positive numbers, got {tuple(self.variances.shape)}"
            )
        self.basis = None if basis is None else torch.as_tensor(basis, dtype=_F64)
        self.means = flat  # (K, D), in the original coordinates
        self.rotated = self._rotate(flat)  # n_k = Uᵀ m_k, (K, D)
        log_weights = torch.as_tensor(log_weights, dtype=_F64)
        self.log_weights = log_weights - torch.logsumexp(log_weights, 0)
        self.schedule = schedule
        self.log_normaliser = float(log_normaliser)

    @classmethod
    def of(cls, mixture: GaussianMixture) -> TiltedMixture:
        """The untilted ``mixture`` itself (U = I, d = s²), to evaluate its density."""
        dim = mixture.means[0].numel()
        return cls(
            mixture.means.detach(),
            torch.full((dim,), mixture.std**2, dtype=_F64),
            mixture.log_weights,
            mixture.schedule,
        )

    def _rotate(self, flat: torch.Tensor) -> torch.Tensor:
        return flat if self.basis is None else flat @ self.basis

    def _unrotate(self, flat: torch.Tensor) -> torch.Tensor:
        return flat if self.basis is None else flat @ self.basis.T

    def _terms(self, x: torch.Tensor, t):
        """(log-weights w̃ (B, K) before normalisation, α (B, 1), 1/v_t (B, D), z (B, D))."""
        if x.shape[1:] != self.event_shape:
            raise ValueError(
                f"x must have shape (B, {', '.join(map(str, self.event_shape))}), got {tuple(x.shape)}"
            )
        tt = time_column(t, x).to(x.device)
        alpha = self.schedule.alpha(tt).to(_F64)[:, None]  # (B, 1)
        sigma = self.schedule.sigma(tt).to(_F64)[:, None]
        inv_v = 1.0 / (alpha**2 * self.variances + sigma**2)  # (B, D)
        z = self._rotate(_flat(x))
        n = self.rotated
        # q_k = Σ_i (z_i − α n_ki)²/v_i, expanded into products: no (B, K, D) tensor
        q = (
            (z**2 * inv_v).sum(1, keepdim=True)
            - 2 * alpha * (z * inv_v) @ n.T
            + alpha**2 * inv_v @ (n**2).T
        )
        return self.log_weights - q / 2, alpha, inv_v, z

    def log_prob(self, x: torch.Tensor, t) -> torch.Tensor:
        """log p_t(x), (B,): logsumexp_k(log π_k − q_k/2) − ½ Σ_i log(2π v_ti).

        (docs/maths.md §14.3)
        """
        logits, _, inv_v, _ = self._terms(x, t)
        value = torch.logsumexp(logits, 1) + 0.5 * torch.log(inv_v / (2 * math.pi)).sum(1)
        return value.to(x.dtype)

    def score(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """∇ log p_t(x) = U (Σ_k w_k (α_t n_k − z)/v_t), shape of x.

        (docs/maths.md §14.3)
        """
        _refuse_cond(cond)
        logits, alpha, inv_v, z = self._terms(x, t)
        mean = torch.softmax(logits, 1) @ self.rotated  # Σ_k w_k n_k, (B, D)
        return self._unrotate((alpha * mean - z) * inv_v).reshape(x.shape).to(x.dtype)

    def x0(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """E[x_0 | x_t = x] = U (n̄ + α_t d/v_t (z − α_t n̄)), n̄ = Σ_k w_k n_k, shape of x;
        finite where α_t = 0 (the mixture's mean there).

        (docs/maths.md §14.3)
        """
        _refuse_cond(cond)
        logits, alpha, inv_v, z = self._terms(x, t)
        mean = torch.softmax(logits, 1) @ self.rotated
        gain = alpha * self.variances * inv_v  # α_t d/v_t, (B, D)
        return self._unrotate(mean + gain * (z - alpha * mean)).reshape(x.shape).to(x.dtype)

    def eps(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """ε*(x, t) = −σ_t ∇ log p_t(x), shape of x.

        (docs/maths.md §14.3)
        """
        sigma = self.schedule.sigma(time_column(t, x)).to(x.dtype)
        return -sigma.reshape(-1, *[1] * (x.ndim - 1)) * self.score(x, t, cond)

    def velocity(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        """v*(x, t) = ε* − E[x_0 | x_t = x], finite on [0, 1] under any schedule.

        (docs/maths.md §14.3)
        """
        return self.eps(x, t, cond) - self.x0(x, t, cond)

    @torch.no_grad()
    def posterior_sample(
        self, x: torch.Tensor, t, m: int, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """m exact draws of x_0 ~ p(x_0 | x_t = x), (m, B, *shape), float64: a component k
        with the posterior weights w_k, then N(U(n_k + α_t d/v_t (z − α_t n_k)), U diag(d σ_t²/v_t) Uᵀ).

        (docs/maths.md §14.3)
        """
        logits, alpha, inv_v, z = self._terms(x, t)
        k = torch.multinomial(torch.softmax(logits, 1), m, replacement=True, generator=generator)
        n = self.rotated[k.T]  # (m, B, D)
        gain = alpha * self.variances * inv_v
        sigma2 = 1 - alpha**2 * self.variances * inv_v  # σ_t²/v_t, (B, D)
        noise = torch.randn(n.shape, generator=generator, dtype=_F64)
        draw = n + gain * (z - alpha * n) + (self.variances * sigma2).sqrt() * noise
        return self._unrotate(draw).reshape(m, x.shape[0], *self.event_shape)

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of the mixture at t = 0, (n, *shape), float64."""
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        noise = torch.randn((n, self.means.shape[1]), generator=generator, dtype=_F64)
        draw = self.rotated[comp] + self.variances.sqrt() * noise
        return self._unrotate(draw).reshape(n, *self.event_shape)


def _refuse_cond(cond) -> None:
    if cond is not None:
        raise ValueError("a TiltedMixture takes no cond: its tilt is its conditioning")


def _check_mixture(mixture) -> None:
    if not isinstance(mixture, GaussianMixture):
        raise TypeError(f"mixture must be a GaussianMixture, got {type(mixture).__name__}")


class QuadraticLoss:
    """L(x) = ‖A x − y‖²/(2τ²), (B,): a linear-Gaussian observation y = A x_0 + τ ξ.

    Args:
        matrix: (P, D) the operator A on flattened images of D pixels.
        observation: (P,) y.
        tau: the observation's noise τ > 0: the posterior is sharp for small τ.

    :meth:`masked` builds inpainting (A = diag(m)); :func:`pooling_matrix` a downsampling A.

    (docs/maths.md §14.2)
    """

    def __init__(self, matrix: torch.Tensor, observation: torch.Tensor, *, tau: float):
        self.matrix = torch.as_tensor(matrix, dtype=_F64)
        self.observation = torch.as_tensor(observation, dtype=_F64)
        if self.matrix.ndim != 2 or self.observation.shape != (self.matrix.shape[0],):
            raise ValueError(
                f"matrix must be (P, D) and observation (P,), got {tuple(self.matrix.shape)} "
                f"and {tuple(self.observation.shape)}"
            )
        check_finite(self.matrix, "matrix")
        check_finite(self.observation, "observation")
        self.tau = check_scale(tau, "tau")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {tau}")

    @classmethod
    def masked(cls, reference: torch.Tensor, mask: torch.Tensor, *, tau: float) -> QuadraticLoss:
        """Inpainting: ‖m ⊙ (x − ref)‖²/(2τ²) for a mask m (0/1 or weights) of ref's shape."""
        reference = torch.as_tensor(reference, dtype=_F64)
        try:
            mask = torch.broadcast_to(torch.as_tensor(mask, dtype=_F64), reference.shape)
        except RuntimeError:
            raise ValueError(
                f"mask must broadcast to the reference's shape {tuple(reference.shape)}, got "
                f"{tuple(torch.as_tensor(mask).shape)}"
            ) from None
        mask, reference = mask.flatten(), reference.flatten()
        return cls(torch.diag(mask), mask * reference, tau=tau)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        residual = x.reshape(x.shape[0], -1) @ self.matrix.to(x).T - self.observation.to(x)
        return (residual**2).sum(1) / (2 * self.tau**2)

    def tilt(self, mixture: GaussianMixture) -> TiltedMixture:
        """p_0 e^{−L}/Z as a :class:`TiltedMixture` (docs/maths.md §14.2)."""
        _check_mixture(mixture)
        s2, tau2 = mixture.std**2, self.tau**2
        a = self.matrix
        if a.shape[1] != mixture.means[0].numel():
            raise ValueError(
                f"matrix must have {mixture.means[0].numel()} columns (the mixture's pixels), "
                f"got {a.shape[1]}"
            )
        curvature, basis = torch.linalg.eigh(a.T @ a)  # AᵀA = V diag(a) Vᵀ
        variances = 1.0 / (1.0 / s2 + curvature.clamp(min=0) / tau2)  # d of Σ = (I/s² + AᵀA/τ²)⁻¹
        mu = mixture.means.detach().reshape(mixture.means.shape[0], -1).to(_F64)
        b = mu / s2 + (a.T @ self.observation) / tau2  # (K, D)
        means = ((b @ basis) * variances) @ basis.T  # m_k = Σ b_k
        c = (
            -((means - mu) ** 2).sum(1) / (2 * s2)
            - ((means @ a.T - self.observation) ** 2).sum(1) / (2 * tau2)
            + 0.5 * torch.log(variances / s2).sum()
        )
        return _tilted(mixture, means, variances, c, basis=basis)


class LinearLoss:
    """L(x) = ⟨w, x⟩, (B,): a linear "classifier" (its scale λ is folded into w).

    Args:
        weight: w, of the images' shape.

    (docs/maths.md §14.2)
    """

    def __init__(self, weight: torch.Tensor):
        self.weight = torch.as_tensor(weight, dtype=_F64)
        check_finite(self.weight, "weight")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ self.weight.to(x).flatten()

    def tilt(self, mixture: GaussianMixture) -> TiltedMixture:
        """p_0 e^{−L}/Z: each component moves by −s² w (docs/maths.md §14.2)."""
        _check_mixture(mixture)
        w = self.weight.flatten()
        mu = mixture.means.detach().reshape(mixture.means.shape[0], -1).to(_F64)
        if w.shape[0] != mu.shape[1]:
            raise ValueError(f"weight must have {mu.shape[1]} entries, got {w.shape[0]}")
        s2 = mixture.std**2
        c = -mu @ w + s2 * (w @ w) / 2
        return _tilted(mixture, mu - s2 * w, torch.full_like(w, s2), c)


class ClassLoss:
    """L(x) = −log E[e^{ℓ_K} | x_0 = x] = −log Σ_k p(k | x) e^{ℓ_k}, (B,): the mixture's own
    exact classifier, with K the component x was drawn from and ℓ (K,) logits ≤ 0 per component.

    With ℓ_k = 0 on the components of digit y and −β elsewhere (:meth:`for_label`),
    e^{−L} = p(y | x) + e^{−β}(1 − p(y | x)), so 0 ≤ L ≤ β; the tilt is the mixture with
    weights π_k e^{ℓ_k}, which is what ``mixture.eps(x, t, cond=ℓ)`` samples.

    (docs/maths.md §14.2)
    """

    def __init__(self, mixture: GaussianMixture, logits: torch.Tensor):
        _check_mixture(mixture)
        self.mixture = mixture
        self.logits = torch.as_tensor(logits, dtype=_F64)
        k = mixture.means.shape[0]
        if self.logits.shape != (k,):
            raise ValueError(f"logits must have shape ({k},), got {tuple(self.logits.shape)}")
        check_finite(self.logits, "logits")
        if bool((self.logits > 0).any()):
            raise ValueError("logits must be ≤ 0, so that L ≥ 0 (a loss DPS's rule can take)")

    @classmethod
    def for_label(cls, mixture: GaussianMixture, label: int, *, strength: float) -> ClassLoss:
        """ℓ_k = 0 on the components of ``label`` (``mixture.labels``), −``strength`` elsewhere."""
        if mixture.labels is None:
            raise ValueError("the mixture has no labels (build it with sk.digits.digits_mixture)")
        check_scale(strength, "strength")
        return cls(mixture, -float(strength) * (mixture.labels != label).to(_F64))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        mu = self.mixture.means.detach().reshape(self.mixture.means.shape[0], -1).to(x)
        flat = x.reshape(x.shape[0], -1)
        q = ((flat**2).sum(1, keepdim=True) - 2 * flat @ mu.T + (mu**2).sum(1)) / (
            2 * self.mixture.std**2
        )
        prior = self.mixture.log_weights.to(x) - q  # log p(k | x) + const, (B, K)
        return torch.logsumexp(prior, 1) - torch.logsumexp(prior + self.logits.to(x), 1)

    def tilt(self, mixture: GaussianMixture) -> TiltedMixture:
        """p_0 e^{−L}/Z: the weights become π_k e^{ℓ_k} (docs/maths.md §14.2)."""
        if mixture is not self.mixture:
            raise ValueError("a ClassLoss tilts the mixture it was built on")
        mu = mixture.means.detach().reshape(mixture.means.shape[0], -1).to(_F64)
        return _tilted(
            mixture, mu, torch.full((mu.shape[1],), mixture.std**2, dtype=_F64), self.logits
        )


def _tilted(mixture, means, variances, c, *, basis=None) -> TiltedMixture:
    """The tilted mixture with log weights log π_k + c_k and log Z = logsumexp(log π + c)."""
    log_weights = mixture.log_weights.to(_F64) + c
    return TiltedMixture(
        means.reshape(-1, *mixture.event_shape),
        variances,
        log_weights,
        mixture.schedule,
        basis=basis,
        log_normaliser=float(torch.logsumexp(log_weights, 0)),
    )


def pooling_matrix(shape: tuple[int, ...], factor: int) -> torch.Tensor:
    """The (D / factor², D) matrix of factor × factor average pooling on images of ``shape``
    (C, H, W), D = C·H·W: the downsampling A of a super-resolution loss."""
    c, h, w = shape
    if h % factor or w % factor:
        raise ValueError(f"factor must divide the image's sides {h} × {w}, got {factor}")
    eye = torch.eye(c * h * w, dtype=_F64).reshape(c * h * w, c, h, w)
    pooled = torch.nn.functional.avg_pool2d(eye, factor)  # row j: pooling of pixel j
    return pooled.reshape(c * h * w, -1).T.contiguous()


class ExactGuidance:
    """The exact guidance of ``mixture`` by ``loss``: h_t, its prediction shift, log E[e^{−L} | x_t].

    Args:
        mixture: a :class:`~sagkit.GaussianMixture` (VP or flow schedule).
        loss: a :class:`QuadraticLoss`, :class:`LinearLoss` or :class:`ClassLoss`.

    Attributes ``prior`` and ``target``: the mixture and its tilt, as :class:`TiltedMixture`.
    """

    def __init__(self, mixture: GaussianMixture, loss):
        _check_mixture(mixture)
        if not hasattr(loss, "tilt"):
            raise TypeError(
                f"loss must be a QuadraticLoss, LinearLoss or ClassLoss, got {type(loss).__name__}"
            )
        self.mixture, self.loss = mixture, loss
        self.prior, self.target = TiltedMixture.of(mixture), loss.tilt(mixture)

    @property
    def schedule(self):
        return self.mixture.schedule

    def score(self, x: torch.Tensor, t) -> torch.Tensor:
        """h_t(x) = ∇_x log E[e^{−L(x_0)} | x_t = x] = ∇ log p̃_t(x) − ∇ log p_t(x), shape of x.

        (docs/maths.md §14.1)
        """
        return self.target.score(x, t) - self.prior.score(x, t)

    def x0_shift(self, x: torch.Tensor, t) -> torch.Tensor:
        """Ẽ[x_0 | x_t] − E[x_0 | x_t] = (σ_t²/α_t) h_t(x): how far the exact guidance moves
        the posterior mean, shape of x (finite at α_t = 0, where it is the means' difference).

        (docs/maths.md §14.1)
        """
        return self.target.x0(x, t) - self.prior.x0(x, t)

    def pred_shift(self, x: torch.Tensor, t, *, frame: Frame | None = None) -> torch.Tensor:
        """F̃ − F: the change of the prediction that samples p̃ instead of p, in ``frame``
        (default the schedule's ODE frame): −σ_t h_t in the ε frame, the posterior mean's
        shift in the data frame, ε's minus x̂0's in the velocity frame. Shape of x.

        (docs/maths.md §14.1)
        """
        frame = ode_frame(self.schedule) if frame is None else frame
        return frame.predict_exact(self.target, x, t) - frame.predict_exact(self.prior, x, t)

    def log_expected(self, x: torch.Tensor, t) -> torch.Tensor:
        """log E[e^{−L(x_0)} | x_t = x] = log p̃_t(x) − log p_t(x) + log Z, (B,).

        (docs/maths.md §14.1)
        """
        return self.target.log_prob(x, t) - self.prior.log_prob(x, t) + self.target.log_normaliser
