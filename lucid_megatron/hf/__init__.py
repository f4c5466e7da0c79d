"""Hugging Face classes of LUCID models; importing this package registers them with the Auto classes.

``import lucid_megatron`` does not import this package (nor transformers); conversion and evaluation do.

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
    """Auto classes find LUCID here without remote code, and ``save_pretrained`` of a model loaded that way
    copies the two code files next to its weights (``register_for_auto_class``), so the saved directory
    reloads with ``trust_remote_code=True`` where this package is not installed."""
    try:
        AutoConfig.register(LucidConfig.model_type, LucidConfig)
        AutoModelForCausalLM.register(LucidConfig, LucidForCausalLM)
    except ValueError:  # already registered (e.g. re-import)
        pass
    LucidConfig.register_for_auto_class()
    LucidForCausalLM.register_for_auto_class("AutoModelForCausalLM")


register_auto_classes()

__all__ = ["AUTO_MAP", "LucidCache", "LucidConfig", "LucidForCausalLM", "REMOTE_CODE_FILES"]
