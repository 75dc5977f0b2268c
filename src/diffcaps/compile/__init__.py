"""Regional compile: ``enable(model, RegionalCompileConfig(...))`` compiles each repeated block once."""

from diffcaps.compile._config import RegionalCompileConfig as RegionalCompileConfig
from diffcaps.compile._functions import active as active, disable as disable, enable as enable

__all__ = ["RegionalCompileConfig", "active", "disable", "enable"]
