"""DP-SGD for a site's local training, with Opacus building blocks.

What reads private data, and how each is made private (see docs/privacy.md):

- phase 1, the VQ-GAN: the autoencoder (its losses read real volumes) and the discriminator (it
  reads real volumes, and reconstructions of them) are both trained with DP-SGD on the same
  Poisson batch; the step is accounted as one Gaussian mechanism of sensitivity sqrt(2) C
  (:class:`node.ledger.Segment`). The generator loss backpropagates through the discriminator:
  during that pass the discriminator's parameters do not require gradients and its per-sample
  hooks are off, so it gets neither gradients nor per-sample gradients from it. The EMA codebook
  would be updated from the data in every forward pass: under DP it is frozen (the quantiser
  runs in eval mode), so it stays a function of the shared model alone.
- phase 2, the diffusion UNet: DP-SGD on (latent, map) pairs; :func:`lsdm.diffusion.train_step`
  is used unchanged with a :class:`opacus.optimizers.DPOptimizer`.

Batches are Poisson samples (each subject joins a step's batch with probability q, batches of
any size, empty ones included: an empty batch still takes a step of pure noise), which is what
the accountant assumes. Noise and sampling draw from a generator seeded from the OS's entropy,
never from the coordinator's round seed (the coordinator could otherwise subtract the noise).

Per-sample gradients: per-layer hooks (Opacus's for Linear and the norms; this module's for
Conv3d and ConvTranspose3d, one grouped weight-gradient convolution each), or functorch;
``GRAD_SAMPLE_MODES`` picks, per network, the mode that measured fastest (bench/bench_dp.py).
The summed weight gradients that autograd computes alongside are never used under DP-SGD (the
optimiser sums the clipped per-sample ones), so convolutions skip them
(:class:`_InputGradientOnlyConv`). Networks are checked with ``ModuleValidator`` and refused if
invalid; nothing is fixed silently.
"""

from __future__ import annotations

import secrets
import types
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from opacus import GradSampleModule
from opacus.grad_sample import register_grad_sampler
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn

from lsdm import diffusion
from lsdm import vqgan as vq

# Opacus's hook on a network's first layer fires with no input gradient (the data needs none).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients")

# "hooks": per-layer hooks (Opacus's, and this module's for Conv3d and ConvTranspose3d);
# "functorch": functorch (vmap for every layer).
GRAD_SAMPLE_MODES = {"autoencoder": "hooks", "discriminator": "hooks", "unet": "hooks"}


def _empty_grads(layer: nn.Module) -> dict:
    grads = {layer.weight: torch.zeros_like(layer.weight).unsqueeze(0)}
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = torch.zeros_like(layer.bias).unsqueeze(0)
    return grads


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(B, C, ...) -> (1, B*C, ...): each sample its own group of channels."""
    return t.reshape(1, -1, *t.shape[2:])


def _per_sample_conv_gradients(layer, inputs, output_grads, backprops) -> dict:
    """Per-sample weight gradients of a convolution: the weight gradient of ONE grouped
    convolution (one group of channels per sample) with input ``inputs`` and output gradient
    ``output_grads``; the bias's from the layer's ``backprops``."""
    n = inputs.shape[0]
    if n == 0:
        return _empty_grads(layer)
    weight = torch.nn.grad.conv3d_weight(
        _grouped(inputs),
        (n * layer.weight.shape[0], *layer.weight.shape[1:]),
        _grouped(output_grads),
        stride=layer.stride,
        padding=layer.padding,
        dilation=layer.dilation,
        groups=n * layer.groups,
    )
    grads = {layer.weight: weight.view(n, *layer.weight.shape)}
    if layer.bias is not None and layer.bias.requires_grad:
        grads[layer.bias] = backprops.sum(dim=(2, 3, 4))
    return grads


@register_grad_sampler(nn.Conv3d)
def conv3d_grad_sample(layer: nn.Conv3d, activations, backprops) -> dict:
    """Per-sample weight gradients of a Conv3d as one grouped weight-gradient convolution,
    instead of Opacus's unfold (im2col), which materialises k^3 copies of the input and is
    several times slower on 3D volumes."""
    if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
        from opacus.grad_sample.conv import compute_conv_grad_sample

        return compute_conv_grad_sample(layer, activations, backprops)
    x = activations[0].to(backprops.dtype)
    return _per_sample_conv_gradients(layer, x, backprops, backprops)


@register_grad_sampler(nn.ConvTranspose3d)
def conv_transpose3d_grad_sample(layer: nn.ConvTranspose3d, activations, backprops) -> dict:
    """Per-sample weight gradients of a ConvTranspose3d (Opacus has no hook for it). The layer
    is the adjoint of a convolution with the same weight, so its weight gradient is that
    convolution's weight gradient with the output gradient as input and the layer's input as
    output gradient."""
    x = activations[0].to(backprops.dtype)
    return _per_sample_conv_gradients(layer, backprops, x, backprops)


class _InputGradientOnlyConv(torch.autograd.Function):
    """A Conv3d or ConvTranspose3d whose backward pass computes the gradient of its input only.
    Under DP-SGD the summed weight gradient autograd would also compute is never used (the
    optimiser sums the clipped per-sample gradients instead), and on 3D volumes it is about half
    the cost of a convolution's backward pass."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, output_padding):
        ctx.save_for_backward(x, weight)
        ctx.layer, ctx.output_padding = layer, output_padding
        if isinstance(layer, nn.ConvTranspose3d):
            return F.conv_transpose3d(
                x, weight, bias, layer.stride, layer.padding, output_padding, layer.groups,
                layer.dilation,
            )  # fmt: skip
        return F.conv3d(x, weight, bias, layer.stride, layer.padding, layer.dilation, layer.groups)

    @staticmethod
    def backward(ctx, grad):
        if not ctx.needs_input_grad[0]:  # the network's first layer: its input is the data
            return None, None, None, None, None
        x, weight = ctx.saved_tensors
        layer = ctx.layer
        grad_input = torch.ops.aten.convolution_backward(
            grad,
            x.to(grad.dtype),
            weight.to(grad.dtype),
            None,
            layer.stride,
            layer.padding,
            layer.dilation,
            isinstance(layer, nn.ConvTranspose3d),
            ctx.output_padding,
            layer.groups,
            [True, False, False],  # input, weight, bias: the input's only
        )[0]
        return grad_input.to(x.dtype), None, None, None, None


def _input_gradient_only_forward(layer, x, output_size=None):
    output_padding = (0, 0, 0)
    if isinstance(layer, nn.ConvTranspose3d):
        output_padding = layer._output_padding(
            x, output_size, layer.stride, layer.padding, layer.kernel_size, 3, layer.dilation
        )
    return _InputGradientOnlyConv.apply(x, layer.weight, layer.bias, layer, tuple(output_padding))


def _skip_summed_conv_gradients(module: nn.Module) -> list[nn.Module]:
    """Give every zero-padded Conv3d and ConvTranspose3d of ``module`` an input-gradient-only
    forward (undone by :func:`_restore_conv_gradients`); returns the layers changed."""
    changed = []
    for layer in module.modules():
        if not isinstance(layer, nn.Conv3d | nn.ConvTranspose3d):
            continue
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            continue
        # an instance attribute (the class's forward is untouched); a bound method, so that a
        # deep copy of the layer is bound to the copy
        layer.forward = types.MethodType(_input_gradient_only_forward, layer)
        changed.append(layer)
    return changed


def _restore_conv_gradients(layers: list[nn.Module]) -> None:
    for layer in layers:
        layer.__dict__.pop("forward", None)  # the class's forward again (closing twice is fine)


class NotPrivatisable(Exception):
    """The network has a layer DP-SGD cannot train (e.g. BatchNorm)."""


def secret_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS's entropy: its draws are unknown to the coordinator."""
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63))
    return generator


def poisson_batches(
    num_items: int, sample_rate: float, steps: int, generator: torch.Generator
) -> Iterator[list[int]]:
    """``steps`` batches, each item in each batch independently with probability
    ``sample_rate`` (batches vary in size and may be empty)."""
    for _ in range(steps):
        mask = torch.rand(num_items, generator=generator, device=generator.device) < sample_rate
        yield mask.nonzero().flatten().tolist()


def sample_rate(num_items: int, batch_size: int) -> float:
    return min(1.0, batch_size / num_items)


def check_valid(module: nn.Module, what: str) -> None:
    was_training = module.training
    module.train()  # the validator checks the network as it will train
    errors = ModuleValidator.validate(module, strict=False)
    module.train(was_training)
    if errors:
        raise NotPrivatisable(f"{what} cannot be trained with DP-SGD: {errors[:3]}")


@dataclass
class PrivateNet:
    """A network with per-sample gradient hooks and its DP optimiser."""

    module: GradSampleModule
    optimiser: DPOptimizer
    input_gradient_only: list[nn.Module]

    def noise_step(self) -> None:
        """The step of an empty batch: no gradient, only noise (the accountant counts it)."""
        self.optimiser.zero_grad(set_to_none=True)
        for p in self.optimiser.params:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
        self.optimiser.step()

    def close(self) -> None:
        self.optimiser.zero_grad(set_to_none=True)
        self.module._close()
        _restore_conv_gradients(self.input_gradient_only)


def make_private(
    module: nn.Module,
    optimiser: torch.optim.Optimizer,
    what: str,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator,
    mode: str | None = None,
) -> PrivateNet:
    """Per-sample gradient hooks on ``module`` (in place: calling ``module`` itself records
    them) and a DP optimiser around ``optimiser``; ``what`` names the network for
    ``GRAD_SAMPLE_MODES`` and error messages."""
    check_valid(module, what)
    mode = mode or GRAD_SAMPLE_MODES[what]
    wrapped = GradSampleModule(
        module, batch_first=True, loss_reduction="mean", force_functorch=mode == "functorch"
    )
    dp_optimiser = DPOptimizer(
        optimiser,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    # functorch differentiates the layers' forward itself: it needs their weight gradients
    skipping = _skip_summed_conv_gradients(module) if mode == "hooks" else []
    return PrivateNet(wrapped, dp_optimiser, skipping)


def freeze_codebook(model: vq.VQGAN) -> None:
    """Keep the EMA codebook as it is: its update reads the data without any noise. The
    quantiser is put in eval mode before each of its forward passes (whatever ``train()`` the
    step calls); its codes are still used, only never moved."""
    quantiser = model.autoencoder.quantizer.quantizer

    def _eval(module, _inputs):
        module._mode_outside = module.training
        module.training = False

    def _restore(module, _inputs, _output):
        module.training = module._mode_outside

    quantiser.register_forward_pre_hook(_eval)
    quantiser.register_forward_hook(_restore)


@dataclass
class PrivateVQGAN:
    autoencoder: PrivateNet
    discriminator: PrivateNet

    def optimisers(self) -> vq.VQGANOptimisers:
        return vq.VQGANOptimisers(self.autoencoder.optimiser, self.discriminator.optimiser)

    def close(self) -> None:
        self.autoencoder.close()
        self.discriminator.close()


def make_private_vqgan(
    model: vq.VQGAN,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator,
    modes: dict[str, str] | None = None,
) -> PrivateVQGAN:
    modes = modes or {}
    freeze_codebook(model)
    optimisers = vq.make_optimisers(model)
    common = dict(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=generator,
    )
    return PrivateVQGAN(
        make_private(
            model.autoencoder,
            optimisers.autoencoder,
            "autoencoder",
            mode=modes.get("autoencoder"),
            **common,
        ),
        make_private(
            model.discriminator,
            optimisers.discriminator,
            "discriminator",
            mode=modes.get("discriminator"),
            **common,
        ),
    )


@contextmanager
def _read_only(private: PrivateNet) -> Iterator[None]:
    """The network is only read (a loss backpropagates through it to its input): its parameters
    get no gradient and no per-sample gradient."""
    params = [p for p in private.module.parameters() if p.requires_grad]
    private.module.disable_hooks()
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)
        private.module.enable_hooks()


def private_vqgan_step(
    model: vq.VQGAN,
    images: torch.Tensor,
    private: PrivateVQGAN,
    step: int,
    maps: torch.Tensor | None = None,
) -> dict[str, float]:
    """:func:`lsdm.vqgan.train_step` under DP-SGD: the same losses and order, with the
    discriminator read-only during the generator's pass. An empty batch is a noise-only step of
    each network the step trains. ``maps`` label-balance the reconstruction loss; each subject's
    weights read only its own map, so the loss stays a sum of per-subject terms."""
    adversarial = step >= model.config.adversarial_start_step
    if images.shape[0] == 0:
        private.autoencoder.noise_step()
        if adversarial:
            private.discriminator.noise_step()
        return {}
    optimisers = private.optimisers()
    if not adversarial:
        return vq.autoencoder_step(model, images, optimisers.autoencoder, maps=maps)[0]
    model.discriminator.train()
    *real_features, real_logits = model.discriminator(images)
    with _read_only(private.discriminator):
        losses, reconstruction = vq.autoencoder_step(
            model, images, optimisers.autoencoder, [f.detach() for f in real_features], maps
        )
    return losses | vq.discriminator_step(
        model, real_logits, reconstruction, optimisers.discriminator
    )


def make_private_ldm(
    model: diffusion.LatentDiffusion,
    noise_multiplier: float,
    max_grad_norm: float,
    expected_batch_size: int,
    generator: torch.Generator,
    mode: str | None = None,
) -> PrivateNet:
    return make_private(
        model.unet,
        diffusion.make_optimiser(model),
        "unet",
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        generator=generator,
        mode=mode,
    )


def private_ldm_step(
    model: diffusion.LatentDiffusion,
    latents: torch.Tensor,
    maps: torch.Tensor,
    private: PrivateNet,
) -> dict[str, float]:
    """:func:`lsdm.diffusion.train_step` with the DP optimiser (every term of its loss is
    per sample); an empty batch is a noise-only step (and the moving average follows it)."""
    if latents.shape[0] == 0:
        private.noise_step()
        model.ema.update_parameters(model.unet)
        return {}
    return diffusion.train_step(model, latents, maps, private.optimiser)


def vqgan_mechanisms(step_from: int, step_to: int, adversarial_start: int) -> list[tuple[int, int]]:
    """(steps, mechanisms per step) of VQ-GAN steps ``step_from .. step_to-1``: one DP release
    per step before the discriminator starts, two after."""
    before = max(0, min(step_to, adversarial_start) - step_from)
    after = max(0, step_to - max(step_from, adversarial_start))
    return [(n, k) for n, k in ((before, 1), (after, 2)) if n > 0]
