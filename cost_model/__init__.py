"""What each option costs and how much it hurts: bytes, FLOPs, latency, error, and the solver.

The solver lives in ``cost_model.solver`` and imports OR-Tools only when called.
"""

from cost_model.calibration import CalibrationError, SiteStats, check_calibration, collect_statistics
from cost_model.error import perturbation_error
from cost_model.latency import PROFILES, DeviceProfile, MatmulCost, dense_cost, get_profile, matmul_cost, roofline_seconds
from cost_model.memory import dtype_size, format_bytes, stored_bytes

__all__ = [
    "PROFILES",
    "CalibrationError",
    "DeviceProfile",
    "MatmulCost",
    "SiteStats",
    "check_calibration",
    "collect_statistics",
    "dense_cost",
    "dtype_size",
    "format_bytes",
    "get_profile",
    "matmul_cost",
    "perturbation_error",
    "roofline_seconds",
    "stored_bytes",
]
