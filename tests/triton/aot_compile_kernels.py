"""AOT-compile every Triton kernel for an NVIDIA target without a GPU (run as a script, TRITON_INTERPRET unset).

Catches what only the compiler sees (branch type mismatches, unsupported ops)
while CI has no GPU. Usage: python aot_compile_kernels.py [sm]
"""
import os, sys, inspect
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.compiler import ASTSource, compile
from triton.backends.compiler import GPUTarget
from rlhf_kernels.triton import logprobs, kl, ppo, advantages

target = GPUTarget("cuda", int(sys.argv[1]) if len(sys.argv) > 1 else 90, 32)

def sig_for(fn, types, consts):
    names = fn.arg_names
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n.endswith("_ptr"):
            sig[n] = types.get(n, "*fp32")
        elif n in ("inv_t", "kl_coef", "ent_coef", "clip_low", "clip_high", "dual_clip", "clamp", "gamma", "gamma_lam"):
            sig[n] = "fp32"
        else:
            sig[n] = "i64" if n in ("ignore_index",) or n.startswith("stride") else "i32"
    return sig

def build(kernel, types, consts, warps):
    fn = kernel
    if "constexprs" in inspect.signature(ASTSource).parameters:  # triton >= 3.3
        src = ASTSource(fn=fn, signature=sig_for(fn, types, consts), constexprs=consts)
    else:  # triton 3.2
        src = ASTSource(fn=fn, signature=sig_for(fn, types, consts), constants=consts)
    k = compile(src, target=target, options={"num_warps": warps})
    md = k.metadata
    print(f"ok {fn.__name__:32s} {types.get('x_ptr', '')} consts={consts} warps={warps} shared={md.shared} regs={getattr(k, 'n_regs', '?')}")

for dt in ("*bf16", "*fp16", "*fp32"):
    build(logprobs._logprobs_fwd_kernel, {"x_ptr": dt, "y_ptr": "*i64"}, {"BLOCK_V": 4096}, 8)
    build(logprobs._logprobs_bwd_kernel, {"x_ptr": dt, "dx_ptr": dt, "y_ptr": "*i64"}, {"BLOCK_V": 4096}, 8)
    build(kl._kl_divergence_fwd_kernel, {"x_ptr": dt, "r_ptr": dt}, {"BLOCK_V": 4096}, 16)
    for need in (True, False):
        build(kl._kl_divergence_bwd_kernel, {"x_ptr": dt, "r_ptr": dt, "dx_ptr": dt, "dr_ptr": dt}, {"BLOCK_V": 4096, "NEED_REF_GRAD": need}, 8)
    for est in (1, 2, 3):
        for clamp in (True, False):
            build(kl._kl_estimate_fwd_kernel, {"logp_ptr": dt, "ref_ptr": dt, "out_ptr": dt}, {"KL_EST": est, "HAS_CLAMP": clamp, "BLOCK": 1024}, 4)
            build(kl._kl_estimate_bwd_kernel, {"logp_ptr": dt, "ref_ptr": dt, "g_ptr": dt, "dlogp_ptr": dt, "dref_ptr": dt}, {"KL_EST": est, "HAS_CLAMP": clamp, "BLOCK": 1024}, 4)
    for has_ref in (True, False):
        for dual in (True, False):
            c = {"BLOCK_V": 4096, "HAS_REF": has_ref, "KL_EST": 3, "HAS_DUAL": dual}
            build(ppo._ppo_fwd_kernel, {"x_ptr": dt, "y_ptr": "*i64"}, c, 8)
            build(ppo._ppo_bwd_kernel, {"x_ptr": dt, "dx_ptr": dt, "y_ptr": "*i64"}, c, 8)
    build(advantages._gae_fwd_kernel, {"r_ptr": dt, "v_ptr": dt, "adv_ptr": dt, "ret_ptr": dt}, {"BLOCK_B": 32}, 1)
for est in (1, 2):
    build(ppo._ppo_fwd_kernel, {"x_ptr": "*bf16", "y_ptr": "*i64"}, {"BLOCK_V": 4096, "HAS_REF": True, "KL_EST": est, "HAS_DUAL": True}, 8)
# float64 outputs (forced triton on float64 logits)
build(logprobs._logprobs_fwd_kernel, {"x_ptr": "*fp64", "y_ptr": "*i64", "logp_ptr": "*fp64", "ent_ptr": "*fp64", "lse_ptr": "*fp64"}, {"BLOCK_V": 4096}, 8)
print("ALL OK")
