# The names diffcaps uses from torchao (which ships no py.typed); checked with mypy.stubtest.
__version__: str
