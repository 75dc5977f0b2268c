"""Bridges to other libraries, each an optional extra imported only when used.

:mod:`diffcaps.interop.diffusers` runs diffcaps models inside diffusers pipelines
(``pip install "diffcaps[diffusers]"``).
"""
