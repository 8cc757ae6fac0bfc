"""Models nobody here wrote, built from a config (no download), for the client tests: Hugging Face
``transformers`` GPT-2, BERT and Llama, and a torchvision-style residual CNN (torchvision's
BasicBlock layout: in-place ReLU, ``out += identity``, a ``norm_layer`` argument, as in its ResNet).
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, SEQ = 96, 12


def hf_model(name: str, seed: int = 0) -> nn.Module:
    """A tiny transformers model, dropout off (every rank and the reference draw no masks)."""
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=SEQ,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    if name == "bert":
        return BertForMaskedLM(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                          intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=SEQ,
                                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    if name == "llama":
        return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                            max_position_embeddings=SEQ))
    raise ValueError(name)


def hf_batch(step: int, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (batch, SEQ), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None,
                 norm_layer=nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    def __init__(self, layers=(1, 1, 1), num_classes: int = 10, norm_layer=nn.BatchNorm2d, width: int = 8):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = norm_layer(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(width, layers[0], 1, norm_layer)
        self.layer2 = self._make_layer(width * 2, layers[1], 2, norm_layer)
        self.layer3 = self._make_layer(width * 4, layers[2], 2, norm_layer)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 4, num_classes)
        for m in self.modules():  # torchvision's initialisation, done by the parent after its children
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int, norm_layer) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), norm_layer(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes, norm_layer=norm_layer) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def group_norm(c: int) -> nn.Module:
    """GroupNorm instead of BatchNorm: per-sample statistics, so a sharded batch computes what the
    whole batch computes (BatchNorm's batch statistics differ per rank, under DDP too)."""
    return nn.GroupNorm(2, c)


def resnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return ResNet(norm_layer=group_norm)


def image_batch(step: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(batch, 3, 16, 16, generator=g), torch.randint(0, 10, (batch,), generator=g)
