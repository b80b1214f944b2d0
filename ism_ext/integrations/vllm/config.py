"""The plugin's one typed configuration, read from vLLM's ``additional_config["ism"]``.

vLLM hands every process of an engine the same ``VllmConfig``; its ``additional_config`` dictionary is the
place vLLM keeps for plugins (``LLM(..., additional_config={"ism": {"scheme": "mas"}})``, or
``vllm serve --additional-config '{"ism": {}}'``). Without an ``"ism"`` entry the plugin stays out of the
way: vLLM's own attention runs, chats render as vLLM renders them, and requests with ranges are refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...config import field_names, unknown_fields
from ...masks.schemes import SCHEMES

__all__ = ["CONFIG_KEY", "SCHEME_KEY", "SERVING_SCHEMES", "IsmServingConfig", "check_scheme"]

CONFIG_KEY = "ism"
# A chat request's own scheme: ``vllm_xargs={"ism_scheme": "mas"}`` (OpenAI server) or ``extra_args`` offline.
SCHEME_KEY = "ism_scheme"
SERVING_SCHEMES = tuple(SCHEMES)


def check_scheme(scheme: Any, name: str) -> str:
    """``scheme`` when it is one of `SERVING_SCHEMES`, else ValueError naming ``name``."""
    if scheme not in SERVING_SCHEMES:
        raise ValueError(f"{name} must be one of {', '.join(SERVING_SCHEMES)}, got {scheme!r}")
    return scheme


@dataclass(frozen=True)
class IsmServingConfig:
    """How the engine serves segment-masked chats.

    Attributes:
        scheme: the scheme a chat request gets when it names none (``"ism"``: system and user turns
            bidirectional, answers causal; ``"mas"``, ``"prefix_lm"``, ``"causal"``; `ism_ext.masks.schemes`).
    """

    scheme: str = "ism"

    def __post_init__(self) -> None:
        check_scheme(self.scheme, f"additional_config['{CONFIG_KEY}']['scheme']")

    @classmethod
    def from_mapping(cls, value: Any) -> IsmServingConfig:
        """From the ``additional_config["ism"]`` entry (a mapping of the attributes above, possibly empty)."""
        if not isinstance(value, Mapping):
            raise ValueError(f"additional_config['{CONFIG_KEY}'] must be a dict, got {type(value).__name__}")
        unknown = unknown_fields(cls, value)
        if unknown:
            raise ValueError(f"additional_config['{CONFIG_KEY}'] has unknown keys {unknown}; "
                             f"known: {field_names(cls)}")
        return cls(**value)

    @classmethod
    def from_vllm_config(cls, vllm_config: Any) -> IsmServingConfig | None:
        """The engine's configuration, or None when it was started without ``additional_config["ism"]``."""
        additional = getattr(vllm_config, "additional_config", None) or {}
        if CONFIG_KEY not in additional:
            return None
        return cls.from_mapping(additional[CONFIG_KEY])
