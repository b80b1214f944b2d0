"""Which kernel runs: one typed configuration, read from the environment once, set per process or per block.

Three kernels are written but have not yet passed their tests on a GPU, so each is opt-in:

* ``hopper_fwd``: the sm_90a forward of `segment_attention` (TMA, wgmma) instead of the FA2-class kernel;
* ``bwd_small_tiles``: the small dK/dV tiles of the CUDA backward (needed on 99 KB GPUs such as sm_86/89/120);
* ``kvcache_kernel``: the dedicated CUDA kernel of `attn_with_kvcache` instead of its composite.

They only change what runs on CUDA; CPU calls ignore them. The environment variables ``ISM_EXT_HOPPER_FWD``,
``ISM_EXT_BWD_SMALL_TILES`` and ``ISM_EXT_KVCACHE_KERNEL`` (anything but unset, "" or "0" means yes) give the
defaults, read once when ``ism_ext`` is imported; after that only this module decides::

    ism_ext.config.set_kernel_config(hopper_fwd=True)           # for the rest of the process
    with ism_ext.config.kernel_config(kvcache_kernel=True):     # for a block, restored after it
        ...

The configuration is process-wide (the C++ ops read their part through one setter op,
``ism::_set_cuda_kernel_choice``, called here whenever it changes), so a block changes it for every thread.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace

import torch

__all__ = ["ENV_DEFAULTS", "KernelConfig", "config_from_env", "field_names", "get_kernel_config", "kernel_config",
           "set_kernel_config", "unknown_fields"]

# The environment variable that gives the default of each field.
ENV_DEFAULTS = {
    "hopper_fwd": "ISM_EXT_HOPPER_FWD",
    "bwd_small_tiles": "ISM_EXT_BWD_SMALL_TILES",
    "kvcache_kernel": "ISM_EXT_KVCACHE_KERNEL",
}


@dataclass(frozen=True)
class KernelConfig:
    """The opt-in CUDA kernels (see the module docstring); all False selects the GPU-verified defaults."""

    hopper_fwd: bool = False
    bwd_small_tiles: bool = False
    kvcache_kernel: bool = False

    def __post_init__(self) -> None:
        for field in fields(self):
            if not isinstance(getattr(self, field.name), bool):
                raise TypeError(f"KernelConfig.{field.name} must be a bool, got {getattr(self, field.name)!r}")


def config_from_env(environ: Mapping[str, str] | None = None) -> KernelConfig:
    """The configuration the environment asks for (``os.environ`` by default): a variable set to anything but
    "" or "0" turns its kernel on."""
    environ = os.environ if environ is None else environ
    return KernelConfig(**{name: environ.get(var, "") not in ("", "0") for name, var in ENV_DEFAULTS.items()})


class _Current:
    """The process's configuration: one object, read from the environment once (at import)."""

    value: KernelConfig = config_from_env()


def get_kernel_config() -> KernelConfig:
    """The configuration in force."""
    return _Current.value


def _push_to_ops(config: KernelConfig) -> None:
    """Hands the C++ part of ``config`` to the CUDA ops (CUDA builds register the setter; CPU builds have none)."""
    ops = torch.ops.ism
    if hasattr(ops, "_set_cuda_kernel_choice"):
        ops._set_cuda_kernel_choice(config.hopper_fwd, config.bwd_small_tiles)


def field_names(config_class: type) -> list[str]:
    """The sorted field names of a dataclass configuration."""
    return sorted(field.name for field in fields(config_class))


def unknown_fields(config_class: type, names: Mapping[str, object] | list[str]) -> list[str]:
    """The sorted ``names`` that are not fields of the dataclass ``config_class`` (the one check of every typed
    configuration of the package)."""
    return sorted(set(names) - set(field_names(config_class)))


def set_kernel_config(config: KernelConfig | None = None, **choices: bool) -> KernelConfig:
    """Sets the process's configuration: ``config`` whole, or the fields named in ``choices`` changed from the
    current one. Returns the previous configuration (to restore it). Raises TypeError for an unknown field or a
    value that is not a bool."""
    new = config if config is not None else _Current.value
    if not isinstance(new, KernelConfig):
        raise TypeError(f"config must be a KernelConfig, got {type(new).__name__}")
    unknown = unknown_fields(KernelConfig, choices)
    if unknown:
        raise TypeError(f"unknown kernel choice(s) {unknown}; the choices are {field_names(KernelConfig)}")
    new = replace(new, **choices)
    previous, _Current.value = _Current.value, new
    _push_to_ops(new)
    return previous


@contextmanager
def kernel_config(config: KernelConfig | None = None, **choices: bool) -> Iterator[KernelConfig]:
    """`set_kernel_config` for the block of a ``with`` statement; the previous configuration is restored after it,
    also when the block raises. Yields the configuration in force inside."""
    previous = set_kernel_config(config, **choices)
    try:
        yield _Current.value
    finally:
        set_kernel_config(previous)
