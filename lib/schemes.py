"""Sharing schemes: which layers of a network are shared by CT and MR.

Every network is cut into four stages: "first" (the first convolutions), "encoder" (the rest
of the contracting path, up to the bottleneck), "decoder" (the expanding path) and "last"
(the layers that produce the logits). A scheme says, per stage, whether the convolution
kernels and the batch-normalisation layers are shared or held once per modality, and
whether the distillation loss is used.

| scheme      | convolutions shared       | BN shared                 | KD  |
|-------------|---------------------------|---------------------------|-----|
| ummkd       | all                       | none                      | yes |
| separate_bn | all                       | none                      | no  |
| joint       | all                       | all                       | no  |
| individual  | none                      | none                      | no  |
| y_shape     | decoder, last             | decoder, last             | no  |
| x_shape     | encoder, decoder          | encoder, decoder          | no  |
"""
from __future__ import annotations

from dataclasses import dataclass

STAGES = ("first", "encoder", "decoder", "last")


@dataclass(frozen=True)
class Scheme:
    name: str
    specific_conv: frozenset  # stages whose convolutions are modality-specific
    specific_bn: frozenset    # stages whose BN layers are modality-specific
    kd: bool                  # whether the distillation term is part of the loss

    def conv_shared(self, stage: str) -> bool:
        _check_stage(stage)
        return stage not in self.specific_conv

    def bn_shared(self, stage: str) -> bool:
        _check_stage(stage)
        return stage not in self.specific_bn


def _check_stage(stage):
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")


_ALL = frozenset(STAGES)
_NONE = frozenset()
SCHEMES = {
    "ummkd": Scheme("ummkd", _NONE, _ALL, kd=True),
    "separate_bn": Scheme("separate_bn", _NONE, _ALL, kd=False),
    "joint": Scheme("joint", _NONE, _NONE, kd=False),
    "individual": Scheme("individual", _ALL, _ALL, kd=False),
    "y_shape": Scheme("y_shape", frozenset({"first", "encoder"}),
                      frozenset({"first", "encoder"}), kd=False),
    "x_shape": Scheme("x_shape", frozenset({"first", "last"}),
                      frozenset({"first", "last"}), kd=False),
}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(f"SCHEME: unknown scheme {name!r}; expected one of "
                         f"{', '.join(SCHEMES)}") from None
