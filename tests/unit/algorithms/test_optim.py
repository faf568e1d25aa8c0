"""The fused Adam every model trains with: same updates as PyTorch's looped Adam, and kept fused
when a run resumes from a checkpoint written before it."""

import torch

from helpers import tiny
from latentforge.algorithms.noise import GlobalNoise
from latentforge.algorithms.optim import adam
from latentforge.data.spec import DataSpec
from latentforge.train.program import build_program


def test_fused_adam_makes_the_looped_adams_updates():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    ref = [p.detach().clone().requires_grad_() for p in params]
    start = [p.detach().clone() for p in params]
    fused, looped = adam(params, 1e-2, (0.5, 0.999)), torch.optim.Adam(ref, lr=1e-2, betas=(0.5, 0.999))
    assert fused.param_groups[0]["fused"] is True and not looped.param_groups[0]["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        looped.step()
    for p, q, p0 in zip(params, ref, start):
        assert (p - p0).abs().min() > 1e-3  # every entry moved (5 steps of lr 1e-2)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_from_before_fused_adam_resumes_fused():
    """Optimiser state saved by a looped Adam carries fused=None; loading it must not turn the
    resumed run's optimisers back into the loop (apply_hyperparameters runs after every load)."""
    program = build_program(tiny("dcgan-mnist"), DataSpec((1, 16, 16), 4), GlobalNoise(0))
    for opt in program.optimizers.values():
        old = torch.optim.Adam([p for g in opt.param_groups for p in g["params"]], lr=1e-3)
        opt.load_state_dict(old.state_dict())
        assert opt.param_groups[0]["fused"] is None  # what loading alone does
    program.apply_hyperparameters()
    assert all(g["fused"] is True for opt in program.optimizers.values() for g in opt.param_groups)
    assert all(g["lr"] != 1e-3 for opt in program.optimizers.values() for g in opt.param_groups)  # the config's
