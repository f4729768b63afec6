"""FCN-8s/16s/32s: shapes on odd sizes, the paper's initialisation, input encoding, no downloads."""

from __future__ import annotations

import copy
import socket

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pipeline import model as model_module
from pipeline.model import (
    FCN,
    Fc6,
    autocast_context,
    bf16_allowed,
    bilinear_kernel,
    build_model,
    encode_maps,
    folded_for_inference,
    pad_to_stride,
    upsample,
)
from pipeline.device import use_amp
from pipeline.params import ModelParams, Params, TrainParams, parse_params

SMALL = 0.0625  # 4-8-16-32-32 channels, fc 256: fast, same layer sequence
ARCHS = ("fcn8s", "fcn16s", "fcn32s")


@pytest.fixture(scope="module")
def models() -> dict[str, FCN]:
    torch.manual_seed(0)
    return {arch: FCN(arch, SMALL).eval() for arch in ARCHS}


def random_maps(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (n, height, width), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("size", [(56, 53), (22, 24), (97, 61), (64, 64)])
def test_logits_have_the_input_size_for_any_size(models: dict[str, FCN], arch: str, size: tuple[int, int]) -> None:
    with torch.no_grad():
        logits = models[arch](encode_maps(random_maps(2, *size)))
    assert logits.shape == (2, 5, *size)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_padding_is_off_wafer_so_56x53_equals_the_map_padded_by_hand_to_64x64(models: dict[str, FCN]) -> None:
    maps = random_maps(2, 56, 53)
    padded_by_hand = torch.zeros(2, 64, 64, dtype=torch.uint8)  # 0 = off-wafer
    padded_by_hand[:, :56, :53] = maps
    model = models["fcn8s"]
    with torch.no_grad():
        logits = model(encode_maps(maps))
        reference = model(encode_maps(padded_by_hand))
    torch.testing.assert_close(logits, reference[..., :56, :53], rtol=0, atol=1e-6)


def test_encode_maps_is_one_hot_of_off_wafer_pass_fail() -> None:
    maps = torch.tensor([[[0, 1, 2], [2, 1, 0]]], dtype=torch.uint8)
    x = encode_maps(maps)
    assert x.shape == (1, 3, 2, 3) and x.dtype == torch.float32
    for value in range(3):
        assert torch.equal(x[0, value], (maps[0] == value).float())
    assert torch.equal(x.sum(dim=1), torch.ones(1, 2, 3))
    assert torch.equal(encode_maps(maps.long()), x)


def test_pad_to_stride_fills_with_the_off_wafer_encoding() -> None:
    x = encode_maps(random_maps(1, 56, 53))
    padded = pad_to_stride(x)
    assert padded.shape == (1, 3, 64, 64)
    assert torch.equal(padded[..., :56, :53], x)
    outside = torch.ones(64, 64, dtype=torch.bool)
    outside[:56, :53] = False
    assert (padded[0, 0][outside] == 1).all()
    assert (padded[0, 1:][:, outside] == 0).all()
    assert pad_to_stride(padded) is padded


@pytest.mark.parametrize("factor", [2, 8, 16, 32])
def test_upsampling_starts_as_bilinear_interpolation_inside_a_border_of_factor_over_2(factor: int) -> None:
    layer = upsample(5, factor)
    x = torch.randn(2, 5, 5, 6)
    with torch.no_grad():
        y = layer(x)
    expected = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
    assert y.shape == expected.shape == (2, 5, 5 * factor, 6 * factor)
    # interpolate clamps at the edge, the transposed conv sees zeros: only the outer factor/2 cells differ
    border = factor // 2
    inner = (..., slice(border, -border), slice(border, -border))
    torch.testing.assert_close(y[inner], expected[inner], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y, expected)


def test_the_models_upsampling_layers_are_bilinear_and_per_class(models: dict[str, FCN]) -> None:
    for layer in (models["fcn8s"].upscore2, models["fcn8s"].upscore_pool4, models["fcn8s"].upscore):
        size = layer.kernel_size[0]
        assert layer.bias is None and layer.stride[0] * 2 == size
        assert torch.equal(layer.weight, bilinear_kernel(5, size))
    kernel = bilinear_kernel(2, 4)
    assert torch.equal(kernel[0, 1], torch.zeros(4, 4))  # no cross-class mixing
    taps = torch.tensor([0.25, 0.75, 0.75, 0.25])
    assert torch.equal(kernel[1, 1], taps[:, None] * taps[None, :])


@pytest.mark.parametrize("arch", ["fcn8s", "fcn16s"])
def test_zero_initialised_skips_add_exactly_nothing_at_init(models: dict[str, FCN], arch: str) -> None:
    model = models[arch]
    x = encode_maps(random_maps(2, 56, 53))
    with torch.no_grad():
        logits = model(x)
        pool5 = model.to_pool5(model.to_pool4(model.to_pool3(pad_to_stride(x))))
        score = model.upscore2(model.score_fr(model.fc(pool5)))
        if arch == "fcn8s":
            score = model.upscore_pool4(score)
        without_skips = model.upscore(score)[..., :56, :53]
    assert without_skips.abs().max() > 0  # the comparison is not between two zero tensors
    assert torch.equal(logits, without_skips)


@pytest.mark.slow
def test_skips_learn_from_the_first_step_despite_zero_init() -> None:
    torch.manual_seed(0)
    model = FCN("fcn8s", SMALL).train()
    maps = random_maps(2, 40, 40)
    loss = F.cross_entropy(model(encode_maps(maps)), maps.long() % 5)
    loss.backward()
    for layer in (model.score_pool4, model.score_pool3):
        assert layer.weight.grad.abs().sum() > 0


def test_width_1_is_vgg16_features_with_the_papers_fc_head() -> None:
    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = FCN("fcn8s", 1.0)
        vgg = torchvision.models.vgg16(weights=None).features
    ours = [*model.to_pool3, *model.to_pool4, *model.to_pool5]
    assert [repr(layer) for layer in ours] == [repr(layer) for layer in vgg]
    assert model.fc[0].weight.shape == (4096, 512, 7, 7) and model.fc[0].padding == (3, 3)
    assert model.fc[3].weight.shape == (4096, 4096, 1, 1)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.3e6, rel=1e-3)


def test_width_scales_every_channel_count() -> None:
    model = FCN("fcn8s", 0.25)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and not isinstance(m, torch.nn.ConvTranspose2d)]
    widths = sorted({m.out_channels for m in convs if m.out_channels != 5})
    assert widths == [16, 32, 64, 128, 1024]
    assert model.to_pool3[0].in_channels == 3


def test_build_model_uses_model_params_and_params_has_a_model_section() -> None:
    assert Params().model == ModelParams() == ModelParams(arch="fcn8s", width=0.125, dropout=0.1)
    params = parse_params({"model": {"arch": "fcn16s", "width": SMALL, "dropout": 0.2}}).model
    model = build_model(params)
    assert model.arch == "fcn16s" and not hasattr(model, "score_pool3")
    assert model.fc[2].p == 0.2
    with pytest.raises(ValueError):
        FCN("fcn4s", SMALL)
    with pytest.raises(ValueError):
        ModelParams(width=0)


def test_building_never_downloads_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model must not download anything")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    for arch in ARCHS:
        build_model(ModelParams(arch=arch, width=SMALL))


def test_cpu_training_uses_bf16_autocast_only_on_amx_and_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    for native_bf16, amx in ((False, False), (True, False), (True, True)):
        monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda native_bf16=native_bf16: native_bf16)
        monkeypatch.setattr(model_module, "cpu_has_amx", lambda amx=amx: amx)
        assert bf16_allowed("cpu", training=True) is amx
        assert bf16_allowed("cpu", training=False) is native_bf16
        with autocast_context("cpu", training=True):
            assert torch.is_autocast_enabled("cpu") is amx
    cpu = torch.device("cpu")
    assert not use_amp(TrainParams(amp="auto"), cpu) and use_amp(TrainParams(amp="bf16"), cpu)
    with autocast_context("cpu", training=False, enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_channels_last_inference_matches_contiguous(models: dict[str, FCN]) -> None:
    x = encode_maps(random_maps(2, 56, 53))
    model = copy.deepcopy(models["fcn8s"])
    with torch.no_grad():
        reference = model(x)
        logits = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(logits, reference, rtol=1e-4, atol=1e-5)


def test_inference_under_bf16_autocast_is_close_to_fp32(models: dict[str, FCN]) -> None:
    x = encode_maps(random_maps(1, 40, 40))
    model = models["fcn8s"]
    with torch.no_grad():
        reference = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
    assert logits.shape == reference.shape
    torch.testing.assert_close(logits.float(), reference, rtol=0.05, atol=0.05 * reference.abs().max().item())


def test_folding_batchnorm_into_the_convs_keeps_the_function_and_leaves_the_model_alone() -> None:
    torch.manual_seed(0)
    model = FCN("fcn8s", SMALL, batch_norm=True, global_context=True)
    for module in model.modules():  # trained-looking statistics and affine terms, not the identity
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    model.pattern_offsets.fill_(0.25)
    model.eval()
    before = copy.deepcopy(model.state_dict())
    folded = folded_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == 13
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    torch.testing.assert_close(folded.pattern_offsets, model.pattern_offsets)
    x = encode_maps(random_maps(3, 56, 53))
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (2, 3), (3, 1), (4, 4), (6, 5), (7, 9)])
def test_fc6_skipping_dead_taps_equals_the_full_7x7_convolution(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    fc6 = Fc6(6, 10)
    x = torch.randn(2, 6, *size, requires_grad=True)
    fc6(x).square().sum().backward()
    grads = (x.grad.clone(), fc6.weight.grad.clone(), fc6.bias.grad.clone())
    x.grad = None
    fc6.zero_grad()
    full = F.conv2d(x, fc6.weight, fc6.bias, padding=3)
    full.square().sum().backward()
    torch.testing.assert_close(fc6(x), full)
    for ours, reference in zip(grads, (x.grad, fc6.weight.grad, fc6.bias.grad)):
        torch.testing.assert_close(ours, reference)
