"""Regional compile: compile each repeated block instead of the whole model."""

from diffcaps.compile._functions import (
    compile_repeated_blocks as compile_repeated_blocks,
    compiled_blocks as compiled_blocks,
    uncompile_repeated_blocks as uncompile_repeated_blocks,
)

__all__ = ["compile_repeated_blocks", "compiled_blocks", "uncompile_repeated_blocks"]
