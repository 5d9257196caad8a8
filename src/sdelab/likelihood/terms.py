"""The terms of a variational bound on −log p(x): one result class for every VLB.

Both the continuous-time VDM bound (:func:`sdelab.vdm.vdm_vlb`) and the discrete-chain bound
(:func:`sdelab.discrete.ddpm_vlb`) return a :class:`VLBResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from sdelab.likelihood.dequantization import nats_to_bpd

__all__ = ["VLBResult"]


@dataclass(frozen=True)
class VLBResult:
    """Per-example terms of a variational bound on −log p(x), each ``(B,)`` in nats.

    Attributes:
        prior: KL(q(x_T | x) ‖ p(x_T)), the prior term.
        diffusion: the diffusion (denoising) term, continuous or T-step.
        reconstruction: −log p(x | x_0) of the decoder; for discrete data with L levels a
            probability mass, so the bound is on −log P(k) and needs no dequantization.
        dims: D, the number of dimensions of one example.

    Properties:
        total: ``(B,)`` prior + diffusion + reconstruction, nats.
        bpd: ``(B,)`` the total in bits per dimension (:func:`nats_to_bpd`).
    """

    prior: Tensor
    diffusion: Tensor
    reconstruction: Tensor
    dims: int

    @property
    def total(self) -> Tensor:
        return self.prior + self.diffusion + self.reconstruction

    @property
    def bpd(self) -> Tensor:
        return nats_to_bpd(self.total, self.dims)
