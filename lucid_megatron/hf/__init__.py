"""Hugging Face classes of LUCID models; importing ``lucid_megatron`` registers them with the Auto classes.

``configuration_lucid.py`` and ``modeling_lucid.py`` are self-contained (torch + transformers): model
directories exported by ``lucid convert to-hf`` carry copies of them for ``trust_remote_code=True``.
"""

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_lucid import LucidConfig
from .modeling_lucid import LucidCache, LucidForCausalLM

REMOTE_CODE_FILES = (Path(__file__).with_name("configuration_lucid.py"), Path(__file__).with_name("modeling_lucid.py"))
AUTO_MAP = {
    "AutoConfig": "configuration_lucid.LucidConfig",
    "AutoModelForCausalLM": "modeling_lucid.LucidForCausalLM",
}


def register_auto_classes() -> None:
    try:
        AutoConfig.register(LucidConfig.model_type, LucidConfig)
        AutoModelForCausalLM.register(LucidConfig, LucidForCausalLM)
    except ValueError:  # already registered (e.g. re-import)
        pass


register_auto_classes()

__all__ = ["AUTO_MAP", "LucidCache", "LucidConfig", "LucidForCausalLM", "REMOTE_CODE_FILES"]
