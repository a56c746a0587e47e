"""The overlapped per-worker pipeline and its stage clocks."""

from gpubatch.engine.clocks import StageClocks, StageTimes, starvation_of
from gpubatch.engine.pipeline import PipelineConfig, run_pipeline

__all__ = ["PipelineConfig", "StageClocks", "StageTimes", "run_pipeline", "starvation_of"]
