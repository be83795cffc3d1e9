"""Expert placement (MoETuner): routing traces -> ILP / baseline placement -> a `Placement` for the dispatcher."""

from .metrics import CostModel, PlacementMetrics, PlanReport, evaluate, objective
from .placement import FORMAT, Placement, PlacementError
from .plan import METHODS, solve
from .trace import RoutingTrace, TraceError, TraceRecorder, record_hf

__all__ = [
    "FORMAT", "METHODS", "CostModel", "Placement", "PlacementError", "PlacementMetrics", "PlanReport",
    "RoutingTrace", "TraceError", "TraceRecorder", "evaluate", "objective", "record_hf", "solve",
]
