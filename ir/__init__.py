"""Capture and analysis: models as FX graphs with shapes, dtypes and parameter names.

No transform logic lives here.
"""

from ir.capture import CaptureError, capture, split_inputs
from ir.graph import shared_input_groups, to_networkx
from ir.sites import SkippedParameter, UseKind, WeightSite, WeightUse, find_weight_sites, sites_from_modules

__all__ = [
    "CaptureError",
    "SkippedParameter",
    "UseKind",
    "WeightSite",
    "WeightUse",
    "capture",
    "find_weight_sites",
    "shared_input_groups",
    "sites_from_modules",
    "split_inputs",
    "to_networkx",
]
