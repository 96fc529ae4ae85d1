"""Compile every Triton kernel variant to a cubin for a GPU target, without a GPU (run as a script).

Run in a process without TRITON_INTERPRET: the interpreter skips Triton's compiler, so type
errors in non-interpreted code paths only show up here. Prints one line per variant.
"""

from __future__ import annotations

import sys

import triton
from sfd_fast.kernels import _common, edm_loss, sid_loss
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTR = "*{}"


def variants(dt: str):
    p = PTR.format(dt)
    yield "sid_forward", sid_loss._sid_forward_kernel, dict(
        x_ptr=p, yr_ptr=p, yf_ptr=p, part_ptr="*fp32", N="i32", CHUNK="i32", n_chunks="i32", alpha="fp32"), dict(BLOCK=1024)
    for w in ((True, True, True), (True, False, False)):
        yield f"sid_backward{w}", sid_loss._sid_backward_kernel, dict(
            x_ptr=p, yr_ptr=p, yf_ptr=p, scale_ptr="*fp32", gx_ptr=p, gyr_ptr=p, gyf_ptr=p, N="i32", CHUNK="i32",
            alpha="fp32"), dict(WRITE_X=w[0], WRITE_YR=w[1], WRITE_YF=w[2], BLOCK=1024)
    for precond in (False, True):
        yield f"edm_forward(precond={precond})", edm_loss._edm_forward_kernel, dict(
            a_ptr=p, t_ptr=p, x_ptr=p, cskip_ptr="*fp32", cout_ptr="*fp32", part_ptr="*fp32", N="i32", CHUNK="i32",
            n_chunks="i32"), dict(PRECOND=precond, BLOCK=1024)
        yield f"edm_backward(precond={precond})", edm_loss._edm_backward_kernel, dict(
            a_ptr=p, t_ptr=p, x_ptr=p, cskip_ptr="*fp32", cout_ptr="*fp32", scale_ptr="*fp32", ga_ptr=p, gt_ptr=p,
            gx_ptr=p, N="i32", CHUNK="i32"), dict(PRECOND=precond, WRITE_A=True, WRITE_T=True, WRITE_X=precond,
                                                   BLOCK=1024)


def main(arch: int, dtypes: list[str]) -> None:
    target = GPUTarget("cuda", arch, 32)
    for sid in (True, False):
        sig = dict(part_ptr="*fp32", weight_ptr="*fp32", per_sample_ptr="*fp32", omega_ptr="*fp32",
                   total_ptr="*fp32", B="i32", n_chunks="i32", inv_n="fp32", omega_min="fp32")
        triton.compile(ASTSource(_common.finalise_kernel, {**sig, "SID": "constexpr", "BLOCK_B": "constexpr"},
                                 dict(SID=sid, BLOCK_B=64)), target=target)
        print(f"ok finalise(sid={sid}) sm_{arch}")
    for dt in dtypes:
        for name, fn, sig, consts in variants(dt):
            sig = {**sig, **{k: "constexpr" for k in consts}}
            compiled = triton.compile(ASTSource(fn, sig, consts), target=target)
            assert "cubin" in compiled.asm, name
            print(f"ok {name} {dt} sm_{arch}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
