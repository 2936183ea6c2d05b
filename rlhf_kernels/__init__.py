"""rlhf_kernels: fused, differentiable ops for RLHF training.

    import rlhf_kernels as rk
    logp, entropy = rk.logprobs(logits[:, :-1], input_ids[:, 1:], return_entropy=True)

Every op accepts ``backend=`` or follows ``RLHF_KERNELS_BACKEND``
(``triton | cuda | cpu | torch``); ``rk.info()`` says which backends are live.
"""

from . import _ext
from .info import info
from .ops._deferred_checks import async_target_checks, check_pending_targets
from .ops.advantages import gae
from .ops.kl import kl_divergence, kl_estimate
from .ops.linear import linear_cross_entropy, linear_logprobs, linear_ppo_loss
from .ops.logprobs import logprobs
from .ops.losses import aggregate_loss, dpo_loss, reward_model_loss, value_loss
from .ops.ppo import PPOLossOutput, ppo_loss

__version__ = "0.1.0"

# Registers torch.ops.rlhf_kernels_C.* (when built) so the custom ops can call
# them however they are reached: eager, a compiled graph, or directly.
_ext.load()

__all__ = [
    "PPOLossOutput",
    "aggregate_loss",
    "async_target_checks",
    "check_pending_targets",
    "dpo_loss",
    "gae",
    "info",
    "kl_divergence",
    "kl_estimate",
    "linear_cross_entropy",
    "linear_logprobs",
    "linear_ppo_loss",
    "logprobs",
    "ppo_loss",
    "reward_model_loss",
    "value_loss",
]
