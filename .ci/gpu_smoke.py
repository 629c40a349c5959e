"""A small run of every CUDA kernel, for compute-sanitizer (memcheck, racecheck):
each op on a few sizes (one element, a chunk plus a tail) and every dtype, a
found_inf skip, AMSGrad and beta1 == 0, and a FusedAdam step. Exits non-zero
if a result is off the plain-PyTorch reference."""
import torch

from pygan_optim import ops, reference
from pygan_optim.optim import FusedAdam


def main() -> None:
    dev = "cuda"
    sizes = [1, 65536 + 3]
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        tol = dict(rtol=2e-2, atol=1e-3) if dtype in (torch.bfloat16, torch.float16) else {}
        xs = [torch.randn(n, device=dev).to(dtype) for n in sizes]
        found = torch.zeros((), device=dev)
        torch.testing.assert_close(ops.scale(xs, 0.5, found), reference.scale(xs, 0.5, found))
        total, _ = ops.l2_norm(xs, 2.0, found)
        torch.testing.assert_close(total, reference.l2_norm(xs, 2.0)[0], **tol)
        ema = [x.clone() for x in xs]
        ops.ema_(ema, xs, 0.9)
        for amsgrad, beta1, skip in ((False, 0.9, False), (True, 0.0, False), (False, 0.9, True)):
            params = [x.clone() for x in xs]
            grads = [torch.randn_like(x) for x in xs]
            m = [torch.zeros_like(x) for x in xs]
            v = [torch.zeros_like(x) for x in xs]
            vmax = [torch.zeros_like(x) for x in xs]
            steps = [torch.zeros((), device=dev) for _ in xs]
            ops.adam_step_(params, grads, m, v, steps, lr=1e-2, beta1=beta1, beta2=0.999,
                           eps=1e-8, amsgrad=amsgrad, max_exp_avg_sqs=vmax,
                           found_inf=torch.ones((), device=dev) if skip else None,
                           grad_scale=torch.tensor(2.0, device=dev), zero_grads=True)
            assert all(float(s) == (0.0 if skip else 1.0) for s in steps)
            assert all(not g.any() for g in grads)
    model = torch.nn.Linear(64, 64).to(dev)
    opt = FusedAdam(model.parameters(), lr=1e-3, betas=(0.0, 0.999))
    for _ in range(2):
        model(torch.randn(8, 64, device=dev)).square().sum().backward()
        opt.step()
    torch.cuda.synchronize()
    print("gpu_smoke: ok")


if __name__ == "__main__":
    main()
