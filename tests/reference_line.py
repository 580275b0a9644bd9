"""A plain, slow twin of ``ElraOptimizer(preconditioner="adam" | "muon")``: one tensor at a time, no foreach.

``factored=True`` is the twin of ``preconditioner="factored"``: the second
moment of a matrix is :class:`FactoredSecondMoment` (see :mod:`elra.factored`).

It restates the rule of :mod:`elra.line_control` and :mod:`elra.geometry`
from their docstrings in the most direct form, so that the optimised
implementation can be checked against it number for number. Of the batch
growth it has only the retrace storm (every 25th refused loss of a 100-step
cycle doubles the micro-batches per real step): its runs are far shorter than a
statistics window. The validation-driven decay is the caller's: ``decay`` is
the decay in force.
"""

from __future__ import annotations

import math

import torch


def orthogonalize(g: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton-Schulz steps on g/|g| (Muon's), on the wide orientation."""
    x = g / (g.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for _ in range(5):
        a = x @ x.T
        x = 3.4445 * x + (-4.7750 * a + 2.0315 * a @ a) @ x
    return x.T if tall else x


class FactoredSecondMoment:
    """Adafactor's v of one matrix as EMAs of its row and column sums of g^2, with a tensor's interface.

    ``v[i, j] = R[i] * C[j] / sum(C)`` for the parameter seen as ``shape[0]`` rows.
    """

    def __init__(self, p):
        self.shape = p.shape
        self.rows = torch.zeros(p.shape[0], dtype=p.dtype)
        self.cols = torch.zeros(p.numel() // p.shape[0], dtype=p.dtype)

    def mul_(self, factor):
        self.rows.mul_(factor)
        self.cols.mul_(factor)
        return self

    def addcmul_(self, g, h, value):
        square = (g * h).reshape(self.rows.numel(), self.cols.numel())
        self.rows.add_(square.sum(1), alpha=value)
        self.cols.add_(square.sum(0), alpha=value)
        return self

    def dense(self):
        total = self.cols.sum()
        v = torch.zeros(self.rows.numel(), self.cols.numel(), dtype=self.rows.dtype)
        if total > 0:
            v = self.rows[:, None] * self.cols[None, :] / total
        return v.reshape(self.shape)

    def sqrt(self):
        return self.dense().sqrt()


def _factors(p) -> bool:
    """Whether ``preconditioner="factored"`` factors ``p``: a matrix where rows + cols < its size."""
    return p.dim() >= 2 and p.shape[0] + p.numel() // p.shape[0] < p.numel()


class ReferenceLine:
    def __init__(
        self, params, lr, classes, decay=0.0, beta1=None, beta2=0.999, eps=1e-8, multiplier=1, target=-0.1,
        factored=False, muon=False,
    ):
        self.target, self.muon = target, muon
        self.params = list(params)
        self.eta, self.deterministic, self.decay = lr, classes <= 1, decay
        if beta1 is None:  # more momentum without noise, where uphill steps restart it
            beta1 = 0.95 if self.deterministic else 0.9
        self.b1, self.b2, self.eps, self.multiplier = beta1, beta2, eps, multiplier
        self.restart = self.from_restart = False
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [FactoredSecondMoment(p) if factored and _factors(p) else torch.zeros_like(p) for p in self.params]
        self.t = 0
        self.moved = [False] * len(self.params)
        self.mean_sq = [0.0] * len(self.params)  # muon: each matrix's EMA of mean(m_hat^2) ...
        self.length = [1.0] * len(self.params)  # ... and its direction's length, set at the accept
        self.started = False
        self.ema_n = self.ema_d = 0.0
        self.peak_xsq = 0.0
        self.ema_g = self.ema_m = None  # EMAs of |g|^2 and |m|^2: the signal share scales the target
        self.losses_seen = []  # (weight-free) EMA statistics are recomputed from these
        self.stat = [0.0, 0.0, 0.0]  # mean, square, weight
        self.last_good = 0.0
        self.pending, self.grad_sums = [], None
        self.retraces = 0
        self.failed = 0  # retraces in a row
        self.accepted_eta = 0.0
        self.steps = 0
        self.cycle_retraces = 0

    def _u(self, i, t):
        """m_hat / (sqrt(v_hat) + eps) = k * w, in the optimizer's order of operations (rounding).

        With ``muon``, a matrix's u is 0.2 * sqrt(max(rows, cols)) * orthogonalize(m), shrunk by its length.
        """
        k = math.sqrt(1 - self.b2**t) / (1 - self.b1**t)
        m = self.m[i]
        if self._matrix(m):
            return k, orthogonalize(m) * (self.length[i] * 0.2 * math.sqrt(max(m.shape)) * (1.0 / k))
        return k, m / (self.v[i].sqrt() + self.eps * math.sqrt(1 - self.b2**t))

    def _matrix(self, m) -> bool:
        return self.muon and m.ndim == 2 and min(m.shape) > 1

    def _shrink(self, i):
        """A muon matrix's direction length, with noise: below 0.3 of its history's RMS, the momentum's RMS sets it."""
        m = self.m[i]
        rms = float(m.norm()) / (math.sqrt(m.numel()) * (1 - self.b1**self.t))
        old = self.mean_sq[i]
        self.mean_sq[i] = rms * rms if old == 0 else old + 0.01 * (rms * rms - old)
        if not self.deterministic:  # without noise the matrices keep their length
            self.length[i] = min(rms / (0.3 * math.sqrt(self.mean_sq[i])), 1.0) if self.mean_sq[i] > 0 else 1.0

    @torch.no_grad()
    def step(self, loss: float, grads):
        """``grads``: one tensor (or None) per parameter, or None when backward was skipped."""
        self.pending.append(float(loss))
        if grads is not None:
            if self.grad_sums is None:
                self.grad_sums = [None if g is None else g.clone() for g in grads]
            else:
                self.grad_sums = [a if g is None else (g.clone() if a is None else a + g) for a, g in zip(self.grad_sums, grads)]
        if len(self.pending) < self.multiplier and grads is not None:
            return
        losses, sums = self.pending, self.grad_sums if grads is not None else None
        self.pending, self.grad_sums = [], None
        n = len(losses)
        bad = [v for v in losses if not math.isfinite(v)]
        loss = bad[0] if bad else math.fsum(losses) / n
        old = [self._u(i, self.t) if self.moved[i] and self.t else None for i in range(len(self.params))]
        old_u = [None if kw is None else kw[0] * kw[1] for kw in old]
        numbers = None
        if sums is not None:
            N = sum(float((sums[i] / n * old_u[i]).sum()) for i in range(len(old_u)) if old_u[i] is not None and sums[i] is not None)
            D = sum(float((self.m[i] / (1 - self.b1**self.t) * old_u[i]).sum()) for i in range(len(old_u)) if old_u[i] is not None)
            usq = sum(float((u * u).sum()) for u in old_u if u is not None)
            xsq = sum(float((p * p).sum()) for p, g in zip(self.params, sums) if g is not None)
            gsq = sum(float(((g / n) ** 2).sum()) for g in sums if g is not None)
            msq = sum(float((m * m).sum()) for m, g in zip(self.m, sums) if g is not None)
            numbers = (N, D, usq, xsq, gsq, msq)
        finite = numbers is not None and all(math.isfinite(v) for v in numbers)
        if not self.started:
            if bad or not finite:
                self.retraces += 1
                return
            self.started = True
            self._count_step()
            return self._accept(loss, None, sums, n)
        self._count_step()
        if not bad and finite and self._acceptable(loss):
            return self._accept(loss, numbers, sums, n)
        self._retrace(loss, numbers if finite else None, old, refused=not bad and finite)

    def _count_step(self):
        self.steps += 1
        if self.steps % 100 == 0:
            self.cycle_retraces = 0

    def _acceptable(self, loss):
        if self.deterministic:
            return loss - self.last_good <= 1e-6 * abs(self.last_good) or self.failed >= 3 or self.restart
        if len(self.losses_seen) < 10 or self.failed >= 10:  # after 10 refusals in a row the statistics are stale
            return True
        mean = self.stat[0] / self.stat[2]
        sd = math.sqrt(max(self.stat[1] / self.stat[2] - mean * mean, 0.0))
        return loss <= mean + 5.0 * sd + 1e-6 * abs(mean)

    def _accept(self, loss, numbers, sums, n):
        restart, self.restart = self.restart, False
        self.from_restart = restart  # the coming step is along g: it shrinks, it never restarts again
        if self.failed >= 3 or restart:
            self.eta = self.accepted_eta
        target = self.target
        if numbers is not None and self.t:
            gsq, msq = numbers[4:]
            self.ema_g = gsq if self.ema_g is None else 0.9 * self.ema_g + 0.1 * gsq
            self.ema_m = msq if self.ema_m is None else 0.9 * self.ema_m + 0.1 * msq
            floor = (1 - self.b1) / (1 + self.b1)  # pure noise: |m|^2 = floor * |g|^2; no noise: |m|^2 = |g|^2
            share = min(max((self.ema_m / self.ema_g - floor) / (1 - floor), 0.0), 1.0) if floor < 1 else 0.0
            target *= share
            if not self.deterministic and share > 0:  # noise: halfway from the short-step ratio to the line minimum
                target += 0.5 * share / (share + (1 - share) * floor) * (1 - share) ** 10
        if numbers is not None:
            self.peak_xsq = max(self.peak_xsq, numbers[3])  # the clip's scale: the largest |x|^2 accepted
        if numbers is not None and numbers[1] > 0 and not restart:
            N, D, usq, xsq = numbers[:4]
            keep, gain = (0.7, 0.3) if self.deterministic else (0.95, 0.1)  # the noise-free pair is exact
            self.ema_n = keep * self.ema_n + (1 - keep) * N
            self.ema_d = keep * self.ema_d + (1 - keep) * D
            if self.ema_d > 0:
                self.eta *= math.exp(gain * min(max(self.ema_n / self.ema_d - target, -1.0), 1.0))
            scale = max(xsq, 0.1 * 0.1 * self.peak_xsq)  # |x| floored at a tenth of the largest |x|
            if scale > 0 and usq > 0:
                self.eta = min(self.eta, 0.1 * math.sqrt(scale / usq))
        self.eta = min(max(self.eta, 1e-12), 1e6)
        self.failed, self.accepted_eta = 0, self.eta
        value = loss
        if not self.deterministic and len(self.losses_seen) >= 10:  # a wild low loss enters at most 10 sd below
            mean = self.stat[0] / self.stat[2]
            value = max(loss, mean - 10.0 * math.sqrt(max(self.stat[1] / self.stat[2] - mean * mean, 0.0)))
        self.stat = [0.98 * self.stat[0] + 0.02 * value, 0.98 * self.stat[1] + 0.02 * value * value, 0.98 * self.stat[2] + 0.02]
        self.losses_seen.append(loss)
        self.last_good = loss
        self.t += 1
        for i, p in enumerate(self.params):
            g = sums[i]
            self.moved[i] = g is not None
            if g is None:
                continue
            if restart:  # m_hat after this update is g
                self.m[i] = g * ((1 - self.b1 ** (self.t - 1)) / n)
            self.m[i].mul_(self.b1).add_(g, alpha=(1 - self.b1) / n)
            self.v[i].mul_(self.b2).addcmul_(g, g, value=(1 - self.b2) / n**2)
            if self.decay:
                p.mul_(1 - self.eta * self.decay)
            if self._matrix(self.m[i]):
                self._shrink(i)
            k, w = self._u(i, self.t)
            p.add_(w, alpha=-self.eta * k)

    def _retrace(self, loss, numbers, old_u, refused):
        self.retraces += 1
        self.failed += 1
        if refused:  # a refused loss; a fault (non-finite loss or gradient, no backward) is not counted
            self.cycle_retraces += 1
            if self.cycle_retraces % 26 == 25 and not self.deterministic:
                self.multiplier = min(2 * self.multiplier, 6250)
        if self.restart:  # back at x_old, which gave no usable gradient this time: stay
            return
        old = self.eta
        new = old / 2
        rise = loss - self.last_good
        if self.deterministic and numbers is not None and math.isfinite(loss) and old > 0:
            if 2 * rise / old + numbers[0] >= 0 and not self.from_restart:
                self.restart, self.eta = True, 0.0  # uphill from x_old: back there, the momentum restarts
                for p, kw in zip(self.params, old_u):
                    if kw is not None:
                        p.add_(kw[1], alpha=old * kw[0])
                return
        if self.deterministic and numbers is not None and math.isfinite(loss) and numbers[1] > 0:
            c = loss - self.last_good + old * numbers[1]
            if c > 0:
                new = min(max(numbers[1] * old * old / (2 * c), old / 10), old / 2)
        self.eta = min(max(new, 1e-12), 1e6)
        for p, kw in zip(self.params, old_u):
            if kw is None:
                continue
            p.add_(kw[1], alpha=(old - self.eta) * kw[0])  # back to x_old - eta*u; the decay of the accepted step stays
