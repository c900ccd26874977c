"""FLAP (An et al., AAAI 2024) and the two baselines of its paper, Wanda-sp and magnitude-sp.

Each scores the input channels of o_proj (a head's channels) and down_proj (FFN
channels); the structured driver (methods/structured/) does the rest (units, structure, budget, bias
compensation). For an input channel j of a projection W (out x in) with input X:

    flap  wifv (default)  Var_n(X_nj) * ||W_:,j||^2      the fluctuation metric
          ifv             Var_n(X_nj)
          wifn            mean_i |W_ij| * sqrt(mean_n X_nj^2)
    wanda-sp              mean_i |W_ij| * ||X_:,j||_2
    magnitude-sp          L1 norm of the structure's weights: |W_:,j|, plus the
                          matching row of q_proj (a head's channel) or gate/up (FFN)

    codeprune prune --model smollm2-135m --method flap --ratio 0.2 --out runs/flap20
    codeprune prune --model smollm2-135m --method wanda-sp --ratio 0.2 --out runs/wsp20

FLAP defaults to the adaptive structure with compensation (the paper's setting);
the baselines to the uniform structure without it (as FLAP's paper runs them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from codeprune.calibration.stats import ChannelStats
from codeprune.errors import ConfigError
from codeprune.methods.registry import register
from codeprune.methods.structured.base import ChannelScoreMethod, StructuredConfig
from codeprune.options import opt

OUTPUT = {"attention": "o_proj", "mlp": "down_proj"}


METRICS = ("wifv", "ifv", "wifn")


@dataclass
class FlapConfig(StructuredConfig):
    structure: str = "adaptive"
    compensation: bool = True
    metric: str = opt("wifv", "FLAP's fluctuation metric", choices=METRICS)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.metric not in METRICS:
            raise ConfigError(f"unknown FLAP metric '{self.metric}': choose {', '.join(METRICS)}")


def fluctuation(metric: str, W: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """FLAP's channel score of a projection W (out, in) from its input statistics."""
    W = W.float()
    if metric == "ifv":
        return stats.var.float()
    if metric == "wifv":
        return stats.var.float() * W.square().sum(0)
    return W.abs().mean(0) * (stats.sumsq / stats.count).sqrt().float()  # wifn


@register("flap")
class FlapPruner(ChannelScoreMethod):
    config_class = FlapConfig

    def channel_scores(self, module: str, linears: dict[str, nn.Linear], stats: ChannelStats) -> torch.Tensor:
        return fluctuation(self.config.metric, linears[OUTPUT[module]].weight, stats)


@register("wanda-sp")
class WandaSPPruner(ChannelScoreMethod):
    def channel_scores(self, module: str, linears: dict[str, nn.Linear], stats: ChannelStats) -> torch.Tensor:
        W = linears[OUTPUT[module]].weight.float()
        return W.abs().mean(0) * stats.l2.float()


@register("magnitude-sp")
class MagnitudeSPPruner(ChannelScoreMethod):
    scores_from_data = False  # the weights alone (data only for compensation)

    def channel_scores(self, module: str, linears: dict[str, nn.Linear], stats) -> torch.Tensor:
        score = linears[OUTPUT[module]].weight.float().abs().sum(0)
        rows = ("q_proj",) if module == "attention" else ("gate_proj", "up_proj")
        for name in rows:
            score = score + linears[name].weight.float().abs().sum(1)
        return score
