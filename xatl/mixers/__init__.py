"""Token mixers by name. Each lives in its own module and is imported when first asked for."""

from __future__ import annotations

import importlib

from xatl.mixers.base import Assignment, Mixer, MixerState

# name -> "module:Class"
MIXERS = {
    "attention": "xatl.mixers.attention:Attention",
    "mamba2": "xatl.mixers.mamba2:Mamba2Mixer",
    "mamba": "xatl.mixers.mamba:MambaMixer",
    "retention": "xatl.mixers.retention:RetentionMixer",
    "gla": "xatl.mixers.gla:GatedLinearAttention",
}
#: the mixer `xatl convert`, `xatl.convert`, the pipeline and the job specs use when none is named:
#: Mamba-2 transferred best of the four on stories260K (bench/results/xatl_vs_scratch: lowest loss in
#: every transferred variant, also at equal wall-clock time) for ~0.7-0.8x GLA's training throughput
#: and a similar constant decode state (bench/results/mixers); see the README's table of mixers
DEFAULT_MIXER = "mamba2"


def get_mixer_class(name: str) -> type[Mixer]:
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; known mixers: {', '.join(MIXERS)}")
    module, cls = MIXERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


__all__ = ["DEFAULT_MIXER", "MIXERS", "Assignment", "Mixer", "MixerState", "get_mixer_class"]
