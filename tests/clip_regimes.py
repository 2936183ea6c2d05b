"""PPO tokens in every regime of the clipped objective (shared by the clip-regime tests of ``ppo_loss`` and
``linear_ppo_loss``): old log-probs at chosen log-ratios from the policy's, each with both signs of the advantage."""

import torch

# log(ratio): below 1 - clip_low, inside, above 1 + clip_high, beyond a dual clip of 3 (ratio > 3), past the ±20
# clamp; each ≥ 0.1 from every kink of clips (0.2, 0.28, 3), where sub-gradients are a convention
LOG_RATIOS = (-25.0, -1.0, -0.1, 0.1, 0.6, 1.5, 2.5, 25.0)


def old_logp_and_advantages(logp: torch.Tensor) -> tuple:
    """``(old_logp, advantages)`` float32 ``[2, len(LOG_RATIOS)]`` for the policy's ``logp`` of that shape (float64):
    ``old_logp = logp - LOG_RATIOS`` in each row, advantages -1.3 in row 0 and 0.7 in row 1."""
    old = (logp - torch.tensor(LOG_RATIOS, dtype=logp.dtype)).float()
    advantages = torch.tensor([[-1.3], [0.7]]).expand(old.shape).contiguous()
    return old, advantages
