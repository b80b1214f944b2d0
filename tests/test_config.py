"""`ism_ext.config`: one typed kernel configuration, environment defaults read once, set per process or block."""

from __future__ import annotations

import pytest

import ism_ext
from ism_ext import config


@pytest.mark.parametrize(("value", "on"), [(None, False), ("", False), ("0", False), ("1", True), ("yes", True)])
def test_environment_gives_the_defaults(value, on):
    for name, var in config.ENV_DEFAULTS.items():
        environ = {} if value is None else {var: value}
        got = config.config_from_env(environ)
        assert getattr(got, name) is on
        assert all(getattr(got, other) is False for other in config.ENV_DEFAULTS if other != name)


def test_environment_is_read_once_not_at_every_call(monkeypatch):
    before = config.get_kernel_config()
    monkeypatch.setenv("ISM_EXT_KVCACHE_KERNEL", "0" if before.kvcache_kernel else "1")
    assert config.get_kernel_config() == before


def test_set_and_block_scope():
    start = config.get_kernel_config()
    previous = config.set_kernel_config(hopper_fwd=True)
    assert previous == start and config.get_kernel_config().hopper_fwd is True
    with config.kernel_config(bwd_small_tiles=True, hopper_fwd=False) as inside:
        assert inside == config.get_kernel_config() == config.KernelConfig(False, True, start.kvcache_kernel)
    assert config.get_kernel_config().hopper_fwd is True and config.get_kernel_config().bwd_small_tiles is False
    with pytest.raises(RuntimeError, match="boom"), config.kernel_config(kvcache_kernel=True):
        raise RuntimeError("boom")  # the block raising still restores the configuration
    assert config.get_kernel_config().kvcache_kernel is start.kvcache_kernel
    config.set_kernel_config(start)
    assert ism_ext.config is config


def test_bad_choices_are_refused():
    with pytest.raises(TypeError, match="unknown kernel choice"):
        config.set_kernel_config(hopper=True)
    with pytest.raises(TypeError, match="must be a bool"):
        config.set_kernel_config(hopper_fwd=1)
    with pytest.raises(TypeError, match="must be a KernelConfig"):
        config.set_kernel_config({"hopper_fwd": True})
