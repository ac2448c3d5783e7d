"""The hyperparameters of every mixer as plain data: their defaults (derived from the attention
shape, so that Q/K/V/O map onto the mixer) and their checks, resolved once, when the config is made.

Like `MambaConfig.ssm_cfg` in mamba_ssm, the config keeps `mixer_options` as a plain dict
`{mixer_name: {option: value}}`; this module fills it and refuses what cannot work, with a
`ValueError` naming the option. The mixers read the resolved dict and check nothing again. It sits
beside the config, below the mixers and torch: it imports nothing of xatl, so that the config never
calls into the mixers (what each option means is documented on its mixer's class).
"""

from __future__ import annotations

import math
from collections.abc import Callable

TIME_STEP_INIT_SCHEMES = ("random", "constant")
GLA_DECAYS = ("scalar", "vector")


# -- checks shared by the mixers ---------------------------------------------------------------------


def _positive_ints(mixer: str, options: dict, keys) -> None:
    for key in keys:
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{mixer} option {key} must be a positive integer, got {value!r}")


def _positive_numbers(mixer: str, options: dict, keys) -> None:
    for key in keys:
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{mixer} option {key} must be a positive number, got {value!r}")


def _booleans(mixer: str, options: dict, keys) -> None:
    for key in keys:
        if not isinstance(options[key], bool):
            raise ValueError(f"{mixer} option {key} must be true or false, got {options[key]!r}")


def _time_step_range(mixer: str, options: dict) -> None:
    """The initial step sizes of the Mamba family: log-uniform in [min, max], floored."""
    _positive_numbers(mixer, options, ("time_step_min", "time_step_max"))
    if options["time_step_min"] > options["time_step_max"]:
        raise ValueError(
            f"{mixer} option time_step_min ({options['time_step_min']}) must not exceed "
            f"time_step_max ({options['time_step_max']})"
        )
    floor = options["time_step_floor"]
    if isinstance(floor, bool) or not isinstance(floor, int | float) or floor < 0:
        raise ValueError(f"{mixer} option time_step_floor must be a number >= 0, got {floor!r}")


TIME_STEP_DEFAULTS = {"time_step_min": 0.001, "time_step_max": 0.1, "time_step_floor": 1e-4}


# -- each mixer: defaults, then checks ---------------------------------------------------------------


def mamba_defaults(config) -> dict:
    return {
        "expand": 2,
        "state_size": 16,
        "time_step_rank": math.ceil(config.hidden_size / 16),
        "conv_kernel": 4,
        "use_conv_bias": True,
        "use_bias": False,
        **TIME_STEP_DEFAULTS,
        "time_step_scale": 1.0,
        "time_step_init_scheme": "random",
    }


def check_mamba(config, options: dict) -> None:
    _positive_ints("mamba", options, ("state_size", "time_step_rank", "conv_kernel"))
    _positive_numbers("mamba", options, ("expand", "time_step_scale"))
    inner = options["expand"] * config.hidden_size
    if inner != round(inner):
        raise ValueError(
            f"mamba option expand ({options['expand']}) times hidden_size ({config.hidden_size}) "
            f"must be a whole number of channels, got {inner}"
        )
    _booleans("mamba", options, ("use_conv_bias", "use_bias"))
    _time_step_range("mamba", options)
    if options["time_step_init_scheme"] not in TIME_STEP_INIT_SCHEMES:
        raise ValueError(
            f"mamba option time_step_init_scheme must be one of {TIME_STEP_INIT_SCHEMES}, "
            f"got {options['time_step_init_scheme']!r}"
        )


def mamba2_defaults(config) -> dict:
    return {
        "num_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "state_size": config.head_dim,
        "n_groups": config.num_attention_heads,
        "conv_kernel": 4,
        "chunk_size": 64,
        "use_conv_bias": True,
        **TIME_STEP_DEFAULTS,
        "norm_eps": 1e-5,
        "norm_before_gate": True,
    }


def check_mamba2(config, options: dict) -> None:
    _positive_ints("mamba2", options, ("num_heads", "head_dim", "state_size", "n_groups", "conv_kernel", "chunk_size"))
    if options["num_heads"] % options["n_groups"]:
        raise ValueError(
            f"mamba2 option num_heads ({options['num_heads']}) must be a multiple of "
            f"n_groups ({options['n_groups']})"
        )
    _booleans("mamba2", options, ("use_conv_bias", "norm_before_gate"))
    _positive_numbers("mamba2", options, ("norm_eps",))
    _time_step_range("mamba2", options)


def retention_defaults(config) -> dict:
    return {
        "num_heads": config.num_attention_heads,
        "head_dim": config.head_dim,
        "value_head_dim": config.head_dim,
        "use_rope": True,
        "decay_range": [5.0, 9.0],
    }


def check_retention(config, options: dict, mixer: str = "retention") -> None:
    _positive_ints(mixer, options, ("num_heads", "head_dim", "value_head_dim"))
    _booleans(mixer, options, ("use_rope",))
    decay_range = options["decay_range"]
    numbers = (
        isinstance(decay_range, list | tuple)
        and len(decay_range) == 2
        and all(isinstance(e, int | float) and not isinstance(e, bool) for e in decay_range)
    )
    if not numbers or not 0 < decay_range[0] <= decay_range[1]:
        raise ValueError(
            f"{mixer} option decay_range must be [low, high] with 0 < low <= high "
            f"(decays 1 - 2**-low ... 1 - 2**-high), got {decay_range!r}"
        )


def gla_defaults(config) -> dict:
    return {
        **retention_defaults(config),
        "use_rope": config.position_embedding_type == "rotary",
        "decay": "scalar",
        "gate_low_rank_dim": 16,
        "gate_logit_normalizer": 16.0,
    }


def check_gla(config, options: dict) -> None:
    check_retention(config, options, mixer="gla")
    if options["decay"] not in GLA_DECAYS:
        raise ValueError(f"gla option decay must be one of {GLA_DECAYS}, got {options['decay']!r}")
    _positive_ints("gla", options, ("gate_low_rank_dim",))
    _positive_numbers("gla", options, ("gate_logit_normalizer",))


def _no_options(config) -> dict:
    return {}


def _nothing_to_check(config, options: dict) -> None:
    pass


#: mixer name -> (defaults from the config, check of the resolved options); the names of
#: `xatl.mixers.MIXERS`, in the same order (a test keeps them so)
MIXER_OPTIONS: dict[str, tuple[Callable[..., dict], Callable[..., None]]] = {
    "attention": (_no_options, _nothing_to_check),
    "mamba2": (mamba2_defaults, check_mamba2),
    "mamba": (mamba_defaults, check_mamba),
    "retention": (retention_defaults, check_retention),
    "gla": (gla_defaults, check_gla),
}


def resolve_mixer_options(config, given: dict) -> dict:
    """`{mixer: options}` for every mixer `config.layer_mixers` uses: `given` over the defaults,
    checked. Refuses unknown mixers, options for mixers no layer uses, and unknown options."""
    unknown_mixers = [name for name in config.layer_mixers if name not in MIXER_OPTIONS]
    if unknown_mixers:
        raise ValueError(f"unknown mixer {unknown_mixers[0]!r}; known mixers: {', '.join(MIXER_OPTIONS)}")
    unused = set(given) - set(config.layer_mixers)
    if unused:
        raise ValueError(f"mixer_options names mixers not used by any layer: {sorted(unused)}")
    resolved = {}
    for name in dict.fromkeys(config.layer_mixers):
        defaults_of, check = MIXER_OPTIONS[name]
        defaults, options = defaults_of(config), dict(given.get(name) or {})
        unknown = set(options) - set(defaults)
        if unknown:
            raise ValueError(
                f"unknown option(s) {sorted(unknown)} for mixer {name!r}; known: {sorted(defaults)}"
            )
        resolved[name] = {**defaults, **options}
        check(config, resolved[name])
    return resolved


__all__ = ["MIXER_OPTIONS", "resolve_mixer_options"]
