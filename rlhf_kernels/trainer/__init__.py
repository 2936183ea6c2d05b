"""A lean SFT -> reward model -> PPO trainer built on the fused ops (nanoGPT style:
one flat file per algorithm, a dataclass config, a plain loop).

    from rlhf_kernels.trainer import SFTConfig, train_sft, RMConfig, train_rm, PPOConfig, train_ppo
    rlhf-kernels demo        # SFT -> RM -> PPO on the embedded gold-reward task
"""
from .demo import DemoConfig, run_demo
from .ppo import PPOConfig, train_ppo
from .reward import RMConfig, train_rm
from .sft import SFTConfig, train_sft

__all__ = ["DemoConfig", "PPOConfig", "RMConfig", "SFTConfig", "run_demo", "train_ppo", "train_rm", "train_sft"]
