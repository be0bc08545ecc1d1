"""LaProp, the optimiser of DreamerV3 and of the published DRAMA code, as the published code computes it.

Generic (not about DRAMA): every drama_*.py script imports it, and `make_optimizer` there adds the warm-up.
"""

import torch


class LaProp(torch.optim.Optimizer):
    """LaProp (Ziyin et al., 2020): Adam whose momentum averages gradients already divided by sqrt(v).

    As the published optimiser (and LaProp's reference code), the momentum averages lr_s * g_s / sqrt(v_s), and
    its bias correction is the same average of the learning rates lr_s: the update is lr_t times the
    lr-weighted mean of the normalised gradients. At a constant lr this is Adam's bias correction; during the
    warm-up it weights the newer gradients, taken at larger learning rates, more. A zero lr does not move the
    parameters (the published code then steps by the whole momentum; the warm-up never gets there).
    """

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-20):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["lr_avg"] = torch.zeros((), dtype=torch.float64)  # sum_s (1 - beta1) beta1^(t-s) lr_s
                    state["exp_avg"] = torch.zeros_like(p)  # the same average of lr_s * g_s / sqrt(v_s)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step, lr = state["step"].item(), group["lr"]
                lr_avg = state["lr_avg"].mul_(beta1).add_((1 - beta1) * lr).item()
                exp_avg_sq = state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                denominator = (exp_avg_sq / (1 - beta2**step)).sqrt_().add_(group["eps"])
                exp_avg = state["exp_avg"].mul_(beta1).add_(p.grad / denominator, alpha=(1 - beta1) * lr)
                p.add_(exp_avg, alpha=-lr / lr_avg if lr_avg > 0 else 0.0)
