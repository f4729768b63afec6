"""The fast paths that are defaults predict what fp32 predicts (benchmarks/speed.py measures how fast they are)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.model import FCN, autocast_context, cpu_has_amx, encode_maps, folded_for_inference
from pipeline.params import Params
from pipeline.predict import IGNORE_INDEX, predict_wafers
from pipeline.synth import generate
from pipeline.wafer import OFF_WAFER

pytestmark = pytest.mark.slow  # training steps on every fast path

WIDTH = 0.125
AGREEMENT_FLOOR = 0.999
amx = pytest.mark.skipif(not cpu_has_amx(), reason="no AMX on this CPU: CPU training stays fp32")
native_bf16 = pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(),
                                 reason="no native bf16 kernels (AVX512-BF16 / AMX) on this CPU")


@pytest.fixture(scope="module")
def wafers():
    return list(generate(Params().synth, seed=3, n=48))


def with_fitted_head(model: FCN, wafers) -> FCN:
    """`model` (random-init encoder) with its score head fitted on its features: class margins like a trained
    model's (argmax of a random-init FCN is decided by near-zero logits, which any rounding flips)."""
    model.eval()
    sized = [w for w in wafers if w.shape[0] <= 64 and w.shape[1] <= 64]
    grid = torch.full((len(sized), 64, 64), OFF_WAFER, dtype=torch.uint8)
    target = torch.full((len(sized), 64, 64), IGNORE_INDEX, dtype=torch.long)
    for i, w in enumerate(sized):
        grid[i, : w.shape[0], : w.shape[1]] = torch.from_numpy(w.map)
        target[i, : w.shape[0], : w.shape[1]] = torch.from_numpy(w.mask.astype(np.int64))
    target[grid == OFF_WAFER] = IGNORE_INDEX
    with torch.no_grad():
        pool3 = model.to_pool3(encode_maps(grid))
        pool4 = model.to_pool4(pool3)
        fc7 = model.fc(model.to_pool5(pool4))
    head = [p for name, p in model.named_parameters() if name.startswith(("score", "upscore"))]
    optimizer = torch.optim.Adam(head, lr=0.01)
    for _ in range(40):
        loss = F.cross_entropy(model.head(fc7, pool4, pool3), target, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


@pytest.fixture(scope="module")
def model(wafers) -> FCN:
    torch.manual_seed(0)
    return with_fitted_head(FCN("fcn8s", WIDTH), wafers)


@pytest.fixture(scope="module")
def bn_model(wafers) -> FCN:
    """The shipped architecture (BatchNorm, global context) with BatchNorm statistics unlike the identity."""
    torch.manual_seed(0)
    model = FCN("fcn8s", WIDTH, batch_norm=True, global_context=True)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    return with_fitted_head(model, wafers)


def agreement_on_wafer(reference: list[np.ndarray], predicted: list[np.ndarray], wafers) -> float:
    same = sum(int((r == p)[w.map != OFF_WAFER].sum()) for r, p, w in zip(reference, predicted, wafers))
    return same / sum(int((w.map != OFF_WAFER).sum()) for w in wafers)


@native_bf16
def test_bf16_channels_last_inference_agrees_with_fp32(model, wafers) -> None:
    """`infer.amp: true, infer.channels_last: true` on a native-bf16 CPU (the infer default)."""
    reference = predict_wafers(model, wafers, 16, torch.device("cpu"), amp=False, channels_last=False)
    fast_model = FCN("fcn8s", WIDTH).eval()
    fast_model.load_state_dict(model.state_dict())
    fast_model = fast_model.to(memory_format=torch.channels_last)
    predicted = predict_wafers(fast_model, wafers, 16, torch.device("cpu"), amp=True, channels_last=True)
    assert agreement_on_wafer(reference, predicted, wafers) >= AGREEMENT_FLOOR


@native_bf16
def test_infers_default_path_agrees_with_fp32(bn_model, wafers) -> None:
    """What `infer` runs on a native-bf16 CPU: BatchNorm folded into the convs, bf16 autocast, channels_last."""
    reference = predict_wafers(bn_model, wafers, 16, torch.device("cpu"), amp=False, channels_last=False)
    fast_model = folded_for_inference(bn_model).to(memory_format=torch.channels_last)
    predicted = predict_wafers(fast_model, wafers, 16, torch.device("cpu"), amp=True, channels_last=True)
    assert agreement_on_wafer(reference, predicted, wafers) >= AGREEMENT_FLOOR


@amx
def test_bf16_training_on_amx_follows_fp32(model, wafers) -> None:
    """`train.amp` bf16 on an AMX CPU through autocast_context: same predictions, same gradient direction."""
    from pipeline.predict import model_input
    from pipeline.train import dataset_example, training_batch

    sized = [w for w in wafers if w.shape[0] <= 64 and w.shape[1] <= 64][:16]
    maps, targets, _, _ = training_batch([dataset_example(w) for w in sized])
    grads, predictions = [], []
    for amp in (False, True):
        net = FCN("fcn8s", WIDTH).eval()  # eval: no dropout, so both runs see the same function
        net.load_state_dict(model.state_dict())
        net = net.to(memory_format=torch.channels_last)
        with autocast_context("cpu", training=True, enabled=amp):
            logits = net(model_input(maps, torch.device("cpu"), channels_last=True))
        F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX).backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
        predictions.append(logits.detach().float().argmax(1))
    on_wafer = maps != OFF_WAFER
    assert (predictions[0] == predictions[1])[on_wafer].float().mean() >= AGREEMENT_FLOOR
    assert torch.isfinite(grads[1]).all()
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


def test_the_score_head_runs_in_fp32_under_bf16_autocast(model) -> None:
    """oneDNN's AMX bf16 backward-weights overruns the heap for a conv with bias, < 16 output channels and
    > 2048 input channels (benchmarks/bf16_training.md; benchmarks/onednn_bf16_crash.py reproduces it): the whole
    5-class head must see fp32."""
    seen: dict[str, tuple[torch.dtype, torch.dtype]] = {}
    hooks = [module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, (args[0].dtype, out.dtype)))
             for name, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(encode_maps(torch.randint(0, 3, (1, 40, 40), dtype=torch.uint8)))
    finally:
        for hook in hooks:
            hook.remove()
    head = {"score_fr", "score_pool4", "score_pool3", "upscore2", "upscore_pool4", "upscore"}
    assert all(seen[name] == (torch.float32, torch.float32) for name in head)
    # Narrow bf16 layers left (the first convs below width 0.25) are far from the overrun's reach (> 2048 inputs).
    narrow_bf16 = [module for name, module in model.named_modules()
                   if getattr(module, "out_channels", 16) < 16 and seen.get(name, (None, None))[1] == torch.bfloat16]
    assert all(module.in_channels <= 64 for module in narrow_bf16)
    assert seen["to_pool3.0"][1] == torch.bfloat16  # the encoder does run in bf16
    assert logits.dtype == torch.float32
