"""Shared pytest settings: deterministic, single-process CPU runs."""

from __future__ import annotations

import torch

torch.manual_seed(0)
