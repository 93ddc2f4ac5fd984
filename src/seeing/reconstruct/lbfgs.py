"""L-BFGS for a batch of independent problems, one per image (variant e of the paper's recipe).

The paper's reference code optimises z image by image with a full-batch L-BFGS
(``seeing/optimize_z_lbfgs.py`` there, ``LBFGS.FullBatchLBFGS`` from PyTorch-LBFGS:
step length 1, a history of 10 curvature pairs, a weak-Wolfe bracketing line search with
at most 10 line-search steps, ``c1=1e-4``, ``c2=0.9``, extrapolation factor 2, quadratic
interpolation once a step is bracketed, curvature pairs with ``y.s <= 1e-2 s.Bs`` skipped,
and a failed line search leaving the iterate where it was).

:class:`PerImageLBFGS` runs that algorithm for N images at once without coupling them: the
first dimension of every parameter indexes the image, every image keeps its own history,
direction, step length, line-search bracket and acceptance, and one evaluation of the
closure (a forward and backward pass over the whole batch) serves every image still
searching. An image's trajectory therefore depends only on its own loss, as if it were
optimised alone (a test checks alone vs. in a batch), which ``torch.optim.LBFGS`` (one
line search for the summed loss) would not give.

Written for this project from the algorithm's description; where it differs from the
reference implementation (non-finite trial values count as a failed Armijo test, the
interpolated step is kept inside the bracket) the README says so.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

# The reference's settings (FullBatchLBFGS defaults and the options optimize_z_lbfgs.py passes)
LR = 1.0
HISTORY_SIZE = 10
MAX_LINE_SEARCH = 10
C1, C2, ETA, CURVATURE_EPS = 1e-4, 0.9, 2.0, 1e-2

Closure = Callable[[], "tuple[Tensor, dict[str, Tensor]]"]


class PerImageLBFGS(Optimizer):
    """L-BFGS with a weak-Wolfe line search, one independent problem per image.

    ``step(closure)``: ``closure()`` zeroes the gradients, computes the per-image losses
    ``(N,)`` of the current parameters, back-propagates their SUM (so image i's gradient is
    that of its own loss) and returns ``(losses, extras)``, ``extras`` a dict of further
    per-image ``(N,)`` values to carry along (e.g. the pixel term). One step is one L-BFGS
    iteration: at most ``1 + max_line_search`` closure evaluations (one more on the very
    first step, to know where it starts). It returns the losses and extras at the START of
    the step, and where each image ended (:attr:`last_step`).

    Images whose starting loss is not finite are never moved (:meth:`frozen`).
    """

    def __init__(self, params: Iterable[Tensor], lr: float = LR, history_size: int = HISTORY_SIZE,
                 max_line_search: int = MAX_LINE_SEARCH, c1: float = C1, c2: float = C2, eta: float = ETA,
                 curvature_eps: float = CURVATURE_EPS):
        params = list(params)
        if not params:
            raise ValueError("PerImageLBFGS needs at least one parameter")
        n = params[0].shape[0]
        if any(p.ndim == 0 or p.shape[0] != n for p in params):
            raise ValueError("every parameter must hold one row per image (same first dimension)")
        if not (lr > 0 and history_size >= 0 and max_line_search >= 1 and 0 < c1 < c2 < 1 and eta > 1
                and curvature_eps > 0):
            raise ValueError("invalid L-BFGS settings")
        super().__init__(params, dict(lr=float(lr), history_size=int(history_size),
                                      max_line_search=int(max_line_search), c1=float(c1), c2=float(c2),
                                      eta=float(eta), curvature_eps=float(curvature_eps)))
        if len(self.param_groups) != 1:
            raise ValueError("PerImageLBFGS takes one parameter group")
        self.num_images = int(n)
        # what the last step did: accepted / failed per image, closure evaluations
        self.last_step: dict[str, Tensor | int] = {}

    # ------------------------------------------------------------ flat views
    @property
    def _params(self) -> list[Tensor]:
        return self.param_groups[0]["params"]

    def _flat(self, tensors: Iterable[Tensor]) -> Tensor:
        return torch.cat([t.reshape(self.num_images, -1) for t in tensors], dim=1).float()

    def _gather_params(self) -> Tensor:
        return self._flat(p.detach() for p in self._params)

    def _gather_grad(self) -> Tensor:
        return self._flat(p.grad if p.grad is not None else torch.zeros_like(p) for p in self._params)

    def _set_params(self, flat: Tensor) -> None:
        offset = 0
        for p in self._params:
            k = p[0].numel()
            p.copy_(flat[:, offset:offset + k].reshape(p.shape).to(p.dtype))
            offset += k

    @property
    def _state(self) -> dict:
        return self.state[self._params[0]]

    def frozen(self) -> Tensor:
        """Images that are not optimised (their starting loss was not finite)."""
        state = self._state
        if "frozen" not in state:
            return torch.zeros(self.num_images, dtype=torch.bool, device=self._params[0].device)
        return state["frozen"] > 0.5  # stored as float: optimizer state is cast to the parameters' dtype

    # ------------------------------------------------------------ the algorithm
    def _evaluate(self, closure: Closure) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        with torch.enable_grad():
            loss, extras = closure()
        return (loss.detach().float().reshape(self.num_images), self._gather_grad(),
                {k: v.detach().float().reshape(self.num_images) for k, v in extras.items()})

    def _direction(self, state: dict, grad: Tensor) -> Tensor:
        """-H grad by the two-loop recursion, per image (empty history slots have rho = 0)."""
        s_hist, y_hist, rho = state["s"], state["y"], state["rho"]
        q = -grad
        m = s_hist.shape[1]
        alphas = [None] * m
        for i in range(m - 1, -1, -1):  # newest pair last
            alphas[i] = rho[:, i] * (s_hist[:, i] * q).sum(1)
            q = q - alphas[i][:, None] * y_hist[:, i]
        r = state["h_diag"][:, None] * q
        for i in range(m):
            beta = rho[:, i] * (y_hist[:, i] * r).sum(1)
            r = r + (alphas[i] - beta)[:, None] * s_hist[:, i]
        return r

    @staticmethod
    def _next_trial(t: Tensor, alpha: Tensor, beta: Tensor, f_a: Tensor, g_a: Tensor, f_b: Tensor,
                    eta: float) -> Tensor:
        """The next step length of the bracketing search: extrapolate by ``eta`` until a step
        fails the Armijo test; then the minimiser of the quadratic through (alpha, f_a, g_a) and
        (beta, f_b), kept within [alpha + 0.2 (beta - alpha), alpha + 0.5 (beta - alpha)];
        bisection where that is undefined."""
        bracketed = torch.isfinite(beta)
        width = beta - alpha
        bisect = alpha + width / 2
        # quadratic interpolation (the reference's polyinterp for two points, one derivative)
        denom = alpha - beta
        curvature = -(f_a - f_b - g_a * denom) / denom.pow(2)
        quad = alpha - g_a / (2 * curvature)
        quad = torch.minimum(torch.maximum(quad, torch.minimum(alpha, beta)), torch.maximum(alpha, beta))
        quad = torch.minimum(torch.maximum(quad, alpha + 0.2 * width), alpha + 0.5 * width)
        interpolated = torch.where(torch.isfinite(quad) & torch.isfinite(f_b) & (quad > 0), quad, bisect)
        return torch.where(bracketed, interpolated, t * eta)

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> tuple[Tensor, dict[str, Tensor]] | None:  # type: ignore[override]
        if closure is None:  # nothing to evaluate: nothing moves (an idle step that only counts)
            return None
        group = self.param_groups[0]
        c1, c2, eta = group["c1"], group["c2"], group["eta"]
        state = self._state
        evals = 0
        if "loss" not in state:  # the first step: where every image starts
            loss, grad, extras = self._evaluate(closure)
            evals += 1
            n, dim, m = self.num_images, grad.shape[1], group["history_size"]
            state.update(loss=loss, grad=grad, extras=extras, n_iter=0,
                         frozen=(~torch.isfinite(loss) | ~torch.isfinite(grad).all(1)).float(),
                         s=grad.new_zeros(n, m, dim), y=grad.new_zeros(n, m, dim), rho=grad.new_zeros(n, m),
                         h_diag=grad.new_ones(n))
        f_k, g_k = state["loss"], state["grad"]
        start = (f_k.clone(), {k: v.clone() for k, v in state["extras"].items()})
        active = ~self.frozen()
        x0 = self._gather_params()
        d = torch.where(active[:, None], self._direction(state, g_k), torch.zeros_like(g_k))
        gtd = (g_k * d).sum(1)

        t = torch.where(active, torch.full_like(f_k, group["lr"]), torch.zeros_like(f_k))
        alpha, beta = torch.zeros_like(f_k), torch.full_like(f_k, math.inf)
        f_a, g_a, f_b = f_k.clone(), gtd.clone(), torch.full_like(f_k, math.nan)
        # where each image ends: its start unless a trial step is accepted
        t_end, f_end, g_end = torch.zeros_like(f_k), f_k.clone(), g_k.clone()
        extras_end = {k: v.clone() for k, v in state["extras"].items()}
        searching, accepted = active.clone(), torch.zeros_like(active)

        self._set_params(x0 + t[:, None] * d)
        f_new, g_new, extras_new = self._evaluate(closure)
        evals += 1
        line_steps = 0
        while bool(searching.any()) and line_steps < group["max_line_search"]:
            gtd_new = (g_new * d).sum(1)
            armijo = torch.isfinite(f_new) & torch.isfinite(gtd_new) & (f_new <= f_k + c1 * t * gtd)
            curvature = gtd_new >= c2 * gtd
            too_long = searching & ~armijo
            beta, f_b = torch.where(too_long, t, beta), torch.where(too_long, f_new, f_b)
            too_short = searching & armijo & ~curvature
            alpha = torch.where(too_short, t, alpha)
            f_a, g_a = torch.where(too_short, f_new, f_a), torch.where(too_short, gtd_new, g_a)
            done = searching & armijo & curvature
            if bool(done.any()):
                t_end, f_end = torch.where(done, t, t_end), torch.where(done, f_new, f_end)
                g_end = torch.where(done[:, None], g_new, g_end)
                extras_end = {k: torch.where(done, extras_new[k], v) for k, v in extras_end.items()}
                accepted |= done
                searching &= ~done
            if not bool(searching.any()):
                break
            line_steps += 1
            if line_steps >= group["max_line_search"]:
                break
            t = torch.where(searching, self._next_trial(t, alpha, beta, f_a, g_a, f_b, eta), t)
            # accepted images sit at their accepted step, the others at their start
            self._set_params(x0 + torch.where(searching, t, t_end)[:, None] * d)
            f_new, g_new, extras_new = self._evaluate(closure)
            evals += 1
        # images still searching failed: they stay where they started (the reference's t = 0)
        failed = searching
        self._set_params(x0 + t_end[:, None] * d)

        # curvature pairs of the accepted steps (skipped when y.s <= eps * s.Bs, Bs = -t g)
        s_vec = t_end[:, None] * d
        y_vec = g_end - g_k
        ys = (y_vec * s_vec).sum(1)
        s_bs = (s_vec * (-t_end[:, None] * g_k)).sum(1)
        update = accepted & (ys > group["curvature_eps"] * s_bs) & (ys > 0)
        if bool(update.any()) and state["s"].shape[1] > 0:
            shift = update[:, None, None]
            state["s"] = torch.where(shift, torch.cat([state["s"][:, 1:], s_vec[:, None]], 1), state["s"])
            state["y"] = torch.where(shift, torch.cat([state["y"][:, 1:], y_vec[:, None]], 1), state["y"])
            rho_new = torch.where(update, 1.0 / ys.clamp_min(1e-30), torch.zeros_like(ys))
            state["rho"] = torch.where(update[:, None], torch.cat([state["rho"][:, 1:], rho_new[:, None]], 1),
                                       state["rho"])
            state["h_diag"] = torch.where(update, ys / (y_vec * y_vec).sum(1).clamp_min(1e-30), state["h_diag"])
        state.update(loss=f_end, grad=g_end, extras=extras_end, n_iter=int(state["n_iter"]) + 1)
        self.last_step = {"accepted": accepted, "failed": failed, "step_length": t_end, "evaluations": evals}
        return start
