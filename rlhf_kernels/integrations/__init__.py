"""Opt-in drop-ins for existing training stacks (DESIGN.md §7: nothing is patched on import).

- ``rlhf_kernels.integrations.trl``: TRL's ``selective_log_softmax`` /
  ``entropy_from_logits`` / ``selective_log_softmax_and_entropy`` with TRL's
  signatures, plus ``patch_trl()`` (a context manager) to swap them into TRL.
- ``rlhf_kernels.integrations.verl``: verl's ``logprobs_from_logits``,
  ``entropy_from_logits``, ``agg_loss`` and ``compute_policy_loss`` /
  ``compute_policy_loss_vanilla``.
- ``rlhf_kernels.integrations.openrlhf``: OpenRLHF's ``log_probs_from_logits`` and
  ``compute_entropy``, plus ``patch_openrlhf()`` to swap them into OpenRLHF's ``Actor``.
- ``rlhf_kernels.integrations.hf``: ``causal_lm_logprobs(model, input_ids, attention_mask)``
  for Hugging Face causal LMs, through the fused linear op (the logits never exist).

Import the submodule you need; none of them imports TRL, verl or OpenRLHF.
"""
