"""DP-SGD at a site (node/privacy.py): per-sample clipping and noise checked on real VQ-GAN steps
against per-sample gradients computed one subject at a time, a DP round's spend and its refusals
before any step, and a private VQ-GAN that still learns. The ledger's accounting is in
test_ledger.py."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from flwr.app import ConfigRecord, RecordDict

from lsdm import vqgan as vq
from lsdm.config import preset
from lsdm.data import make_dataset, open_cohort
from lsdm.diffusion import build_ldm
from lsdm.phantom import write_cohort
from node import privacy
from node.client_app import Refusal, pack, run_round, unpack
from node.ledger import LEDGER_NAME, Ledger, Segment, plan_noise
from tests.helpers import SMALL_SHAPE

BIN = Path(sys.executable).parent


def _config(**vqgan):
    return preset("tiny").with_overrides(
        data={"shape": SMALL_SHAPE, "batch_size": 3}, vqgan={"adversarial_start_step": 0, **vqgan}
    )


@pytest.fixture(scope="module")
def images(small_cohort) -> torch.Tensor:
    dataset = make_dataset(open_cohort(small_cohort), _config().data)
    return torch.stack([dataset[i]["image"] for i in range(3)])


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _per_sample_grads(model: vq.VQGAN, images: torch.Tensor):
    """Gradients of each subject's own losses, one subject at a time (no per-sample machinery):
    the autoencoder's (L1, codebook, adversarial, feature matching) and the discriminator's
    (hinge on the real volume and on its reconstruction)."""
    config = model.config
    criterion = vq._adversarial_loss(config)
    ae_params = [p for p in model.autoencoder.parameters() if p.requires_grad]
    d_params = list(model.discriminator.parameters())
    ae_grads, d_grads = [], []
    for x in images.split(1):
        *real_features, real_logits = model.discriminator(x)
        reconstruction, quantisation = model.autoencoder(x)
        *fake_features, fake_logits = model.discriminator(reconstruction)
        matching = sum(
            F.l1_loss(f, r.detach()) for f, r in zip(fake_features, real_features, strict=True)
        ) / len(fake_features)
        loss = (
            F.l1_loss(reconstruction, x)
            + quantisation
            + config.adversarial_weight
            * criterion(fake_logits, target_is_real=True, for_discriminator=False)
            + config.feature_matching_weight * matching
        )
        ae_grads.append(torch.autograd.grad(loss, ae_params))
        fake_logits = model.discriminator(reconstruction.detach())[-1]
        d_loss = 0.5 * (
            criterion(real_logits, target_is_real=True, for_discriminator=True)
            + criterion(fake_logits, target_is_real=False, for_discriminator=True)
        )
        d_grads.append(torch.autograd.grad(d_loss, d_params))
    return ae_grads, d_grads


def _norms(grads) -> torch.Tensor:
    return torch.stack([torch.sqrt(sum(g.square().sum() for g in sample)) for sample in grads])


def _clipped_mean(grads, bound: float, batch: int) -> list[torch.Tensor]:
    factors = (bound / (_norms(grads) + 1e-6)).clamp(max=1.0)
    return [
        sum(f * sample[i] for f, sample in zip(factors, grads, strict=True)) / batch
        for i in range(len(grads[0]))
    ]


def test_per_sample_gradients_are_clipped_before_noise_on_a_real_step(images):
    torch.manual_seed(0)
    model = vq.VQGAN(_config().vqgan)
    privacy.freeze_codebook(model)
    reference = copy.deepcopy(model)
    ae_grads, d_grads = _per_sample_grads(reference, images)
    # a bound between the subjects' gradient norms, halfway from the smallest to the median: the
    # smallest is not clipped, the other two are (one clipped subject of three moved the step by
    # under 1 % on some data)
    ae_bound, d_bound = (
        float(_norms(g).min() + _norms(g).median()) / 2 for g in (ae_grads, d_grads)
    )
    assert (_norms(ae_grads) > ae_bound * 1.01).any() and (_norms(ae_grads) < ae_bound).any()

    private = privacy.make_private_vqgan(model, 0.0, 1.0, 3, _seeded())
    private.autoencoder.optimiser.max_grad_norm = ae_bound
    private.discriminator.optimiser.max_grad_norm = d_bound
    privacy.private_vqgan_step(model, images, private, step=5)
    got_ae = [p.grad for p in private.autoencoder.optimiser.params]
    got_d = [p.grad for p in private.discriminator.optimiser.params]
    private.close()

    for got, grads, bound in ((got_ae, ae_grads, ae_bound), (got_d, d_grads, d_bound)):
        want = _clipped_mean(grads, bound, 3)
        unclipped = [sum(s[i] for s in grads) / 3 for i in range(len(grads[0]))]
        error = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
        scale = max(float(w.abs().max()) for w in want)
        assert error < 1e-4 * scale
        # and clipping did change the step
        assert max(float((u - w).abs().max()) for u, w in zip(unclipped, want, strict=True)) > (
            1e-2 * scale
        )
    # the discriminator's gradient is its own loss's only: the generator's pass through it
    # (adversarial and feature-matching terms) left nothing (checked above against d_grads)
    # and the frozen codebook did not move
    assert torch.equal(model.codebook, reference.codebook)


def test_noise_has_the_expected_scale(images):
    torch.manual_seed(0)
    base = vq.VQGAN(_config(adversarial_start_step=100).vqgan)
    grads = {}
    for sigma in (0.0, 2.0):
        model = copy.deepcopy(base)
        private = privacy.make_private_vqgan(model, sigma, 0.5, 4, _seeded(1))
        privacy.private_vqgan_step(model, images, private, step=0)
        grads[sigma] = torch.cat([p.grad.flatten() for p in private.autoencoder.optimiser.params])
        private.close()
    noise = (grads[2.0] - grads[0.0]) * 4  # DPOptimizer divides by the expected batch size
    assert noise.numel() > 10_000
    assert abs(float(noise.std()) / (2.0 * 0.5) - 1) < 0.03
    assert abs(float(noise.mean())) < 0.05


@pytest.mark.parametrize(
    "layer",
    [
        torch.nn.Conv3d(3, 5, 3, padding=1),
        torch.nn.Conv3d(4, 6, 4, stride=2, padding=1, groups=2),
        torch.nn.ConvTranspose3d(4, 3, 4, stride=2, padding=1),
        torch.nn.ConvTranspose3d(4, 2, 3, padding=1, bias=False),
    ],
    ids=str,
)
def test_grouped_per_sample_conv_gradients_equal_one_sample_at_a_time(layer):
    x = torch.randn(3, layer.in_channels, 6, 8, 8)
    grad_out = torch.randn_like(layer(x))
    if isinstance(layer, torch.nn.Conv3d):
        got = privacy.conv3d_grad_sample(layer, [x], grad_out)
    else:
        got = privacy.conv_transpose3d_grad_sample(layer, [x], grad_out)
    for i in range(3):
        layer.zero_grad()
        (layer(x[i : i + 1]) * grad_out[i : i + 1]).sum().backward()
        assert torch.allclose(got[layer.weight][i], layer.weight.grad, atol=1e-4)
        if layer.bias is not None:
            assert torch.allclose(got[layer.bias][i], layer.bias.grad, atol=1e-4)


def test_private_convolutions_skip_the_summed_weight_gradient_until_closed():
    """Under DP the convolutions' backward computes input gradients only; the per-sample
    gradients and the gradient reaching the layers below are those of the plain network, and
    closing gives the network its ordinary backward pass back."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1),
        torch.nn.SiLU(),
        torch.nn.Conv3d(4, 4, 4, stride=2, padding=1),
        torch.nn.SiLU(),
        torch.nn.ConvTranspose3d(4, 3, 4, stride=2, padding=1),
    )
    reference = copy.deepcopy(net)
    x = torch.randn(3, 2, 4, 8, 8)
    grad_out = torch.randn(3, 3, 4, 8, 8)
    want = [torch.autograd.grad((reference(x[i : i + 1]) * grad_out[i]).sum(),
                                list(reference.parameters())) for i in range(3)]  # fmt: skip

    private = privacy.make_private(
        net, torch.optim.SGD(net.parameters(), lr=0.1), "unet", 1.0, 1.0, 3, _seeded()
    )
    ((net(x) * grad_out).sum() / 3).backward()  # the mean of the subjects' losses
    for p, *per_sample in zip(net.parameters(), *want, strict=True):
        assert p.grad is None  # the summed gradient was never computed
        assert torch.allclose(p.grad_sample, torch.stack(per_sample), atol=1e-4)
    private.close()

    (net(x) * grad_out).sum().backward()
    summed = [sum(g) for g in zip(*want, strict=True)]
    for p, g in zip(net.parameters(), summed, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-4)


def test_per_sample_gradients_of_a_unet_with_attention_equal_one_subject_at_a_time():
    """The diffusion UNet with an attention level (as the reference preset has): every
    parameter's per-sample gradient, through SPADE, attention, GroupNorm, Linear and Conv3d
    layers, equals that subject's own gradient."""
    torch.manual_seed(0)
    config = preset("tiny").with_overrides(
        data={"shape": (16, 32, 32)}, diffusion={"attention_levels": (False, True)}
    )
    unet = build_ldm(config, 5).unet
    assert any(".attn." in name for name, _ in unet.named_parameters())
    with torch.no_grad():  # the UNet starts with zeroed output layers: nothing upstream would
        for p in unet.parameters():  # get a gradient, and the comparison would be of zeros
            p.normal_(0.0, 0.1)
    reference = copy.deepcopy(unet)
    noisy = torch.randn(3, *config.vqgan.latent_shape((16, 32, 32)))
    timesteps = torch.tensor([10, 500, 900])
    maps = F.one_hot(torch.randint(0, 5, (3, 16, 32, 32)), 5).permute(0, 4, 1, 2, 3).float()
    params = list(reference.parameters())
    want = [
        torch.autograd.grad(
            reference(noisy[i : i + 1], timesteps[i : i + 1], seg=maps[i : i + 1]).square().sum(),
            params,
        )
        for i in range(3)
    ]
    private = privacy.make_private(
        unet, torch.optim.SGD(unet.parameters(), lr=0.1), "unet", 1.0, 1.0, 3, _seeded()
    )
    (unet(noisy, timesteps, seg=maps).square().sum() / 3).backward()
    expected = [torch.stack(per_sample) for per_sample in zip(*want, strict=True)]
    scales = torch.tensor([float(e.abs().max()) for e in expected])
    # (some biases have a zero gradient up to rounding: a key bias under softmax, say)
    assert (scales > 1e-6 * scales.max()).float().mean() > 0.8
    for p, e, scale in zip(unet.parameters(), expected, scales, strict=True):
        assert float((p.grad_sample - e).abs().max()) < 1e-4 * scale + 1e-7 * scales.max()
    private.close()


def test_a_network_with_batchnorm_is_refused_not_fixed():
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 2, 3), torch.nn.BatchNorm3d(2))
    with pytest.raises(privacy.NotPrivatisable, match="BatchNorm"):
        privacy.make_private(
            net, torch.optim.SGD(net.parameters(), lr=0.1), "unet", 1.0, 1.0, 2, _seeded()
        )
    assert isinstance(net[1], torch.nn.BatchNorm3d)


def test_private_ldm_step_and_empty_batches_take_noisy_steps():
    config = preset("tiny").with_overrides(data={"shape": SMALL_SHAPE})
    ldm = build_ldm(config, 5)
    before = {k: v.clone() for k, v in ldm.unet.state_dict().items()}
    private = privacy.make_private_ldm(ldm, 1.0, 1.0, 4, _seeded())
    latents = torch.rand(3, *config.vqgan.latent_shape(SMALL_SHAPE)) * 2 - 1
    maps = F.one_hot(torch.randint(0, 5, (3, *SMALL_SHAPE)), 5).permute(0, 4, 1, 2, 3).float()
    losses = privacy.private_ldm_step(ldm, latents, maps, private)
    assert losses["loss"] > 0
    moved = {k for k, v in ldm.unet.state_dict().items() if not torch.equal(v, before[k])}
    assert moved
    after_one = {k: v.clone() for k, v in ldm.unet.state_dict().items()}
    assert privacy.private_ldm_step(ldm, latents[:0], maps[:0], private) == {}
    changed = [k for k, v in ldm.unet.state_dict().items() if not torch.equal(v, after_one[k])]
    assert len(changed) > 0.9 * len(moved)  # pure noise still moves (almost) every weight
    private.close()


def test_poisson_batches_have_the_sampling_rate():
    sizes = [len(b) for b in privacy.poisson_batches(10, 0.3, 2000, _seeded())]
    assert abs(sum(sizes) / len(sizes) - 3.0) < 0.15
    assert 0 in sizes and max(sizes) > 5  # sizes vary, empty batches happen


# --- one site round with DP, in process --------------------------------------------------------


@pytest.fixture()
def dp_site(tmp_path):
    write_cohort(tmp_path / "cohort", subjects=4, shape=SMALL_SHAPE, seed=3)
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump({"kind": "site", "name": "dp-site", "dp": {"target_epsilon": 5.0}})
    )
    labels = open_cohort(tmp_path / "cohort").labels
    node_config = {"cohort": str(tmp_path / "cohort"), "policy": str(policy),
                   "workdir": str(tmp_path / "work"), "threads": 1}  # fmt: skip
    return tmp_path, labels, node_config


def _round(labels, phase="vqgan", **overrides) -> tuple[RecordDict, dict]:
    config = {
        "phase": phase,
        "round": 1,
        "preset": "tiny",
        "shape": json.dumps(list(SMALL_SHAPE)),
        "labels": json.dumps({str(k): v for k, v in labels.items()}),
        "local_steps": 3,
        "step_offset": 0,
        "seed": 1,
        "dp_required": True,
        "max_epsilon": 10.0,
        "rounds_vqgan": 2,
        "rounds_diffusion": 2,
        "local_steps_vqgan": 3,
        "local_steps_diffusion": 3,
    } | overrides
    state = vq.VQGAN(preset("tiny").vqgan).state_dict()
    return RecordDict({"arrays": pack(state), "config": ConfigRecord(config)}), state


def test_a_dp_round_spends_from_the_ledger_and_reports_epsilon(dp_site):
    root, labels, node_config = dp_site
    content, sent = _round(labels)
    reply = run_round(content, node_config)
    metrics = dict(reply.metric_records["metrics"])
    ledger = Ledger.of_cohort(root / "cohort")
    assert metrics["dp"] == 1 and metrics["delta"] == 1e-5
    assert metrics["epsilon"] == pytest.approx(ledger.epsilon(1e-5, "rdp"))
    assert 0 < metrics["epsilon"] < 5.0
    assert ledger.steps == 3 and ledger.rounds[0]["noise_multiplier"] == metrics["noise_multiplier"]
    assert not {"recon_l1", "quantisation"} & set(metrics)  # no noiseless statistics leave
    state = unpack(reply.array_records["arrays"])
    codebook = "autoencoder.quantizer.quantizer.embedding.weight"
    assert torch.equal(state[codebook], sent[codebook])
    assert "REFUSED" not in (root / "work" / "node.log").read_text()
    # the calibration: a DP site sends no statistic of its latents
    calibration = dict(
        run_round(_round(labels, "calibrate")[0], node_config).metric_records["metrics"]
    )
    assert calibration["latent_range_public"] == 1
    assert not any(k.startswith("latent_low") for k in calibration)
    # the federation's max_epsilon caps the site's own budget
    capped, _ = _round(labels, round=2, step_offset=3, max_epsilon=4.0)
    capped_metrics = dict(run_round(capped, node_config).metric_records["metrics"])
    assert metrics["epsilon"] < capped_metrics["epsilon"] <= 4.0
    assert capped_metrics["epsilon_budget"] == 4.0


def test_a_round_past_the_budget_is_refused_with_nothing_trained(dp_site):
    root, labels, node_config = dp_site
    ledger_path = root / "cohort" / LEDGER_NAME
    Ledger(ledger_path, [(0.6, 0.5, 400)], [{"phase": "vqgan"}]).save()  # ε far beyond 5
    before = ledger_path.read_bytes()
    with pytest.raises(Refusal, match="privacy budget: the budget is spent"):
        run_round(_round(labels)[0], node_config)
    assert ledger_path.read_bytes() == before
    assert "REFUSED round 1 (vqgan): privacy budget" in (root / "work" / "node.log").read_text()
    # a plan too long for the budget left is refused as well, at its first round
    ledger_path.unlink()
    with pytest.raises(Refusal, match="do not fit"):
        run_round(_round(labels, rounds_vqgan=10_000)[0], node_config)
    assert not ledger_path.exists()
    assert not list((root / "work").glob("latents-*"))


def test_a_site_without_dp_is_refused_when_the_federation_requires_it(dp_site):
    root, labels, node_config = dp_site
    policy = root / "nodp.yaml"
    policy.write_text(yaml.safe_dump({"kind": "site", "name": "open", "dp": {"enabled": False}}))
    with pytest.raises(Refusal, match="requires differential privacy"):
        run_round(_round(labels)[0], node_config | {"policy": str(policy)})


def test_private_vqgan_learns_at_epsilon_10(tmp_path):
    """ε = 10 at δ = 1e-5 over 80 steps on 8 phantom subjects: the reconstruction error of the
    whole cohort falls (without DP the same steps take it from ~0.8 to ~0.35)."""
    write_cohort(tmp_path / "cohort", subjects=8, shape=SMALL_SHAPE, seed=0)
    config = preset("tiny").with_overrides(
        data={"shape": SMALL_SHAPE, "batch_size": 4}, vqgan={"lr": 3e-3}
    )
    dataset = make_dataset(open_cohort(tmp_path / "cohort"), config.data)
    images = torch.stack([dataset[i]["image"] for i in range(len(dataset))])
    q, steps = privacy.sample_rate(8, 4), 80
    sigma = plan_noise([], [Segment(q, steps)], 10.0, 1e-5, "rdp", 10.0)
    torch.manual_seed(0)
    model = vq.VQGAN(config.vqgan)

    def error() -> float:
        return float((vq.reconstruct(model, images) - images).abs().mean())

    start = error()
    generator = _seeded(2)
    private = privacy.make_private_vqgan(model, sigma, 1.0, 4, generator)
    for step, batch in enumerate(privacy.poisson_batches(8, q, steps, generator)):
        privacy.private_vqgan_step(model, images[batch], private, step)
    private.close()
    assert sigma > 1.0  # real noise, not a token amount
    assert error() < 0.9 * start
