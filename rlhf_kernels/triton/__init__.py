"""Triton kernels and their launchers, one file per op family (no autograd here).

``logprobs.py`` (log-prob + entropy), ``kl.py`` (exact KL, k1/k2/k3 estimators),
``ppo.py`` (fused per-token PPO term), ``advantages.py`` (GAE); shared jitted
helpers and the block-size table live in ``_common.py``. The custom ops in
``rlhf_kernels/ops`` import these lazily, so the package imports without
Triton. On the CPU the kernels run under ``TRITON_INTERPRET=1`` (set before
``triton`` is first imported).

Conventions: one program per row for the vocabulary reductions (online
softmax with one block-max per program and per-lane sums, one read of the logits), a 2-D (rows x vocab blocks)
grid for the backward passes, int64 row offsets, row strides passed in
(``logits[:, :-1]`` needs no copy), masks on every load, fp32 accumulation,
outputs written in the dtype of the tensor the launcher allocates. Not
implemented: an ``inplace_backward`` mode writing ``dlogits`` into the logits
buffer (it would have to be declared in ``mutates_args`` and breaks the
functional contract ``opcheck`` and ``torch.compile`` rely on).
"""
