"""Gradient Equilibrium (Li et al., ICCV 2019, "Improved Techniques for Training Adaptive Deep
Networks"): the identity forward, whose backward multiplies the gradient by a constant.

As ``GradientRescaleFunction`` of kalviny/IMTA, models/msdnet_ge.py, at commit
a9378373241c3247db01f826e3cd8025702fa54b: ``scale * grad`` with ``scale`` a Python float, so
that the product is the authors' to the bit. The scale is a constant of the graph, so a CUDA
graph captures it; the forward returns a view of its input, so forward values never change.
"""
import torch


class _RescaleGradient(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.scale * grad, None


def rescale_gradient(x, scale):
    """``x`` itself forward; ``scale`` (a float) times its gradient backward."""
    return _RescaleGradient.apply(x, float(scale))
