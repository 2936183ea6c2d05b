"""Triton kernels and their launchers, one file per op family (no autograd here).

``logprobs.py`` (log-prob + entropy), ``kl.py`` (exact KL, k1/k2/k3 estimators),
``ppo.py`` (fused per-token PPO term), ``advantages.py`` (GAE). The custom ops
in ``rlhf_kernels/ops`` import these lazily, so the package imports without
Triton. On the CPU the kernels run under ``TRITON_INTERPRET=1``.
"""
