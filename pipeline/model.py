"""FCN-8s (Long, Shelhamer & Darrell 2015) on a VGG16 encoder, for one-hot encoded wafer maps.

Layout follows the paper and pytorch-fcn: VGG16 conv stages split at pool3 (/8), pool4 (/16) and
pool5 (/32); fc6/fc7 as convolutions; score layers; learned upsampling initialised to bilinear.
Two deliberate differences: inputs are padded to a multiple of 32 (with the off-wafer encoding)
instead of conv1's padding=100, so every upsampling is an exact 2x/8x/16x/32x with no crop offsets;
and no pretrained weights are ever downloaded (wafer maps are not ImageNet images).
"""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision.models.vgg import cfgs, make_layers

from pipeline.params import ModelParams
from pipeline.wafer import NUM_CLASSES

log = logging.getLogger(__name__)

Arch = Literal["fcn8s", "fcn16s", "fcn32s"]
MAP_CHANNELS = 3  # one-hot of off-wafer, pass, fail
STRIDE = 32  # total downsampling of the encoder; inputs are padded to a multiple of it
FC_CHANNELS = 4096


def encode_maps(maps: torch.Tensor) -> torch.Tensor:
    """(N, H, W) die grids in {0 off-wafer, 1 pass, 2 fail} -> float one-hot (N, 3, H, W)."""
    return F.one_hot(maps.long(), MAP_CHANNELS).permute(0, 3, 1, 2).float()


def pad_to_stride(x: torch.Tensor, stride: int = STRIDE) -> torch.Tensor:
    """Pad an encoded batch at the bottom/right to a multiple of `stride` with off-wafer cells."""
    height, width = x.shape[-2:]
    pad = (0, -width % stride, 0, -height % stride)
    if not any(pad):
        return x
    off_wafer = F.pad(x[:, :1], pad, value=1.0)
    rest = F.pad(x[:, 1:], pad, value=0.0)
    return torch.cat([off_wafer, rest], dim=1)


def bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """Per-channel (diagonal) bilinear upsampling weight for ConvTranspose2d, as in pytorch-fcn."""
    factor = (size + 1) // 2
    centre = factor - 1 if size % 2 == 1 else factor - 0.5
    taps = 1 - (torch.arange(size, dtype=torch.float64) - centre).abs() / factor
    weight = torch.zeros(channels, channels, size, size, dtype=torch.float64)
    weight[range(channels), range(channels)] = taps[:, None] * taps[None, :]
    return weight.float()


def upsample(channels: int, factor: int) -> nn.ConvTranspose2d:
    """Learned `factor`x upsampling; kernel 2f, padding f/2 gives exactly f*H with no crop."""
    layer = nn.ConvTranspose2d(channels, channels, 2 * factor, stride=factor, padding=factor // 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(bilinear_kernel(channels, 2 * factor))
    return layer


def vgg16_stages(width: float, batch_norm: bool = False) -> tuple[nn.Sequential, nn.Sequential, nn.Sequential]:
    """VGG16 (cfg 'D') conv layers with channels scaled by `width`, split after pool3/pool4/pool5; with
    batch_norm, torchvision's vgg16_bn layout (BatchNorm after every conv).

    Built with torchvision's make_layers, exactly as vgg16() builds `features`; calling vgg16()
    itself would also allocate its 120M-parameter classifier only to throw it away.
    """
    cfg = [v if v == "M" else max(1, round(v * width)) for v in cfgs["D"]]
    layers = list(make_layers(cfg, batch_norm=batch_norm))
    pools = [i for i, layer in enumerate(layers) if isinstance(layer, nn.MaxPool2d)]
    to_pool3, to_pool4, to_pool5 = pools[2] + 1, pools[3] + 1, pools[4] + 1
    return (
        nn.Sequential(*layers[:to_pool3]),
        nn.Sequential(*layers[to_pool3:to_pool4]),
        nn.Sequential(*layers[to_pool4:to_pool5]),
    )


class Fc6(nn.Conv2d):
    """fc6: the paper's 7x7 convolution with padding 3 (same weights), run the way oneDNN runs fast.

    Two exact rewrites. On a pool5 map of side s < 4 (inputs of at most 96 cells a side) the taps
    more than s-1 from the centre meet only padding, so only the central 2s-1 taps run. And the
    zero padding is applied to the input, not asked of the conv: for a padded 7x7 kernel larger
    than its 512-channel input oneDNN's AVX2 build has no fast backward-weights kernel and falls back
    to its reference one (16-78 s a step at width 1; benchmarks/bf16_training.md). Outputs and
    gradients are those of the plain conv.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, kernel_size=7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reach_h, reach_w = (min(side - 1, 3) for side in x.shape[-2:])
        weight = self.weight[:, :, 3 - reach_h : 4 + reach_h, 3 - reach_w : 4 + reach_w]
        return F.conv2d(F.pad(x, (reach_w, reach_w, reach_h, reach_h)), weight, self.bias)


def out_channels(stage: nn.Sequential) -> int:
    return [m for m in stage if isinstance(m, nn.Conv2d)][-1].out_channels


class FCN(nn.Module):
    """FCN-8s/16s/32s. Input: encoded maps (N, 3, H, W) of any size; output: logits (N, 5, H, W).

    The score/upsampling head (every layer with 5 output channels) always runs in fp32, also inside
    a bf16 autocast region: oneDNN's AMX bf16 backward-weights kernel overruns the heap for a conv
    with bias, fewer than 16 output channels and more than 2048 inputs (score_fr at width 1 aborted
    training with `free(): invalid next size`; benchmarks/bf16_training.md, reproducer
    benchmarks/onednn_bf16_crash.py). The head is under 0.1% of the FLOPs.
    """

    def __init__(self, arch: Arch = "fcn8s", width: float = 1.0, dropout: float = 0.5,
                 presence_sharpness: float = 4.0, batch_norm: bool = False, global_context: bool = False):
        super().__init__()
        if arch not in ("fcn8s", "fcn16s", "fcn32s"):
            raise ValueError(f"unknown arch {arch!r}; expected fcn8s, fcn16s or fcn32s")
        if width <= 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.arch = arch
        self.presence_sharpness = presence_sharpness
        # Per defect class, added to its score margin over background by the wafer-level decision: row 0 to
        # decide presence, row 1 to claim dies (pipeline/patterns.py); calibrated on real val after training
        # (train.calibrate), saved with the weights.
        self.register_buffer("pattern_offsets", torch.zeros(2, NUM_CLASSES - 1))
        self.to_pool3, self.to_pool4, self.to_pool5 = vgg16_stages(width, batch_norm)
        fc = max(1, round(FC_CHANNELS * width))
        self.fc = nn.Sequential(
            Fc6(out_channels(self.to_pool5), fc),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
            nn.Conv2d(fc, fc, 1),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout),
        )
        self.score_fr = nn.Conv2d(fc, NUM_CLASSES, 1)
        # Global context (ParseNet, Liu et al. 2015): fc7 averaged over the whole map scores each class once
        # per wafer, and that score is added to every die's. Whether a wafer carries a pattern is a whole-map
        # question; this path answers it directly. Zero at init, so the net starts as the plain FCN.
        self.score_global = zero_conv(fc) if global_context else None
        self._init_like_vgg()

        if arch == "fcn32s":
            self.upscore = upsample(NUM_CLASSES, 32)
            return
        self.score_pool4 = zero_conv(out_channels(self.to_pool4))
        self.upscore2 = upsample(NUM_CLASSES, 2)
        if arch == "fcn16s":
            self.upscore = upsample(NUM_CLASSES, 16)
            return
        self.score_pool3 = zero_conv(out_channels(self.to_pool3))
        self.upscore_pool4 = upsample(NUM_CLASSES, 2)
        self.upscore = upsample(NUM_CLASSES, 8)

    def _init_like_vgg(self) -> None:
        """torchvision's VGG init for the conv layers; the classifier (score_fr) small, like VGG's Linear."""
        for module in [*self.to_pool3, *self.to_pool4, *self.to_pool5, *self.fc]:
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.score_fr.weight, 0.0, 0.01)
        nn.init.zeros_(self.score_fr.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        pool3 = self.to_pool3(pad_to_stride(x))
        pool4 = self.to_pool4(pool3)
        fc7 = self.fc(self.to_pool5(pool4))
        if torch.is_autocast_enabled(x.device.type):
            with torch.autocast(x.device.type, enabled=False):
                return self.head(fc7.float(), pool4.float(), pool3.float())[..., :height, :width]
        return self.head(fc7, pool4, pool3)[..., :height, :width]

    def head(self, fc7: torch.Tensor, pool4: torch.Tensor, pool3: torch.Tensor) -> torch.Tensor:
        """Class scores from fc7 and the skips (and the global context), upsampled to the padded input size."""
        score = self.score_fr(fc7)  # /32
        if self.arch != "fcn32s":
            score = self.upscore2(score) + self.score_pool4(pool4)  # /16
        if self.arch == "fcn8s":
            score = self.upscore_pool4(score) + self.score_pool3(pool3)  # /8
        score = self.upscore(score)
        if self.score_global is not None:  # added after upsampling: the same for every die of the wafer
            score = score + self.score_global(fc7.mean(dim=(2, 3), keepdim=True))
        return score


UNDERFLOW = 80.0  # exp(-80) ~ 1.8e-35
NO_FAIL_PRESENCE = -1e4  # a wafer without a failing die: no class present


def presence_logits(logits: torch.Tensor, fail: torch.Tensor, sharpness: float) -> torch.Tensor:
    """Wafer-level evidence (N, 4) for each defect class, pooled from the FCN's own score maps.

    Per failing die, the margin of class c's score over background; pooled over the failing dies of a
    wafer by log-mean-exp with `sharpness` r: (1/r) log mean exp(r * margin). It lies between the mean and
    the max of the margins, so a positive value means some die leans to class c, and a small pattern on a
    wafer full of fails still counts. Wafers without a failing die get a large negative value.
    """
    margins = (logits[:, 1:] - logits[:, :1]).float().flatten(2) * sharpness  # (N, 4, dies)
    fail = fail.flatten(1).unsqueeze(1)  # (N, 1, dies)
    count = fail.sum(-1)  # (N, 1)
    # logsumexp by hand: the CPU's exp is 10x slower on numbers that underflow to 0 (masked dies, margins far
    # below the peak), and exp(-80) is already lost beside the peak's exp(0) in float32
    peak = margins.masked_fill(~fail, float("-inf")).amax(-1, keepdim=True)
    peak = torch.where(count[..., None] > 0, peak, 0.0).detach()
    terms = torch.exp((margins - peak).clamp(-UNDERFLOW, 0.0)) * fail  # > 0 only on dies that do not count
    pooled = torch.log(terms.sum(-1).clamp(min=1e-30)) + peak.squeeze(-1) - torch.log(count.clamp(min=1).float())
    return torch.where(count > 0, pooled, NO_FAIL_PRESENCE) / sharpness


def zero_conv(channels: int) -> nn.Conv2d:
    """A skip's 1x1 score layer, zero at init so the finer net starts as the coarser one (paper, 4.2)."""
    layer = nn.Conv2d(channels, NUM_CLASSES, 1)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


def build_model(params: ModelParams) -> FCN:
    model = FCN(params.arch, params.width, params.dropout, params.presence_sharpness, params.batch_norm,
                params.global_context)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("built %s width=%g: %.1fM parameters", params.arch, params.width, n_params / 1e6)
    return model


def folded_for_inference(model: FCN) -> FCN:
    """An eval-mode copy of `model` with each BatchNorm folded into the conv before it: the same function up
    to rounding, one pass over memory less per conv. The encoder's maps are thin (8-64 channels at width 0.125),
    so those passes cost about a sixth of inference. Training keeps the unfolded model."""
    folded = copy.deepcopy(model).eval()
    for name in ("to_pool3", "to_pool4", "to_pool5"):
        layers: list[nn.Module] = []
        for layer in getattr(folded, name):
            if isinstance(layer, nn.BatchNorm2d) and layers and isinstance(layers[-1], nn.Conv2d):
                layers[-1] = fuse_conv_bn_eval(layers[-1], layer)
            else:
                layers.append(layer)
        setattr(folded, name, nn.Sequential(*layers))
    return folded


# --- precision: the one rule train and infer share (benchmarks/bf16_training.md has the evidence) ---


def cpu_has_native_bf16() -> bool:
    """oneDNN has bf16 kernels here (AVX512-BF16 / AMX); without them bf16 runs ATen's slow fallbacks."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_amx() -> bool:
    """AMX tiles (Sapphire Rapids and later): where bf16 training was measured safe and faster."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def bf16_allowed(device: torch.device | str, training: bool) -> bool:
    """The one rule for bf16 autocast: only where it is measured fast and safe (benchmarks/bf16_training.md).

    CUDA: where the GPU supports bf16. CPU inference: with native bf16 kernels (AVX512-BF16 / AMX),
    3.1x fp32 at width 1 and 1.8x at width 0.25 on an AMX host; on AVX2 bf16 runs ATen fallbacks
    3-13x slower than fp32. CPU training: on AMX only, 1.4-1.55x fp32 there. It is safe because FCN
    keeps its 5-channel head in fp32: oneDNN's AMX bf16 backward-weights of a conv with bias, fewer
    than 16 output channels and more than 2048 inputs overruns the heap (score_fr at width 1 aborted training with
    `free(): invalid next size`); with the head in fp32, 120 bf16 training steps at widths 1 and 0.25,
    batches 8-32, maps 32..224, ran clean. On AVX512-BF16 without AMX bf16 training is no faster than fp32
    with a fused AdamW: fp32 there.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu" or not cpu_has_native_bf16():
        return False
    return not training or cpu_has_amx()


def autocast_context(device: torch.device | str, training: bool, enabled: bool = True) -> torch.autocast:
    """bf16 autocast where `bf16_allowed`, else a disabled autocast (plain fp32)."""
    device = torch.device(device)
    use_bf16 = enabled and bf16_allowed(device, training)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
