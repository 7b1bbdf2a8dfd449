"""Continuous-batching scheduler; it talks to the model runner only through ``scheduler.output``."""
from loraplex.scheduler.output import (
    ModelRunnerOutput,
    SampledToken,
    ScheduledRequest,
    SchedulerOutput,
)
from loraplex.scheduler.scheduler import Scheduler

__all__ = ["ModelRunnerOutput", "SampledToken", "ScheduledRequest", "Scheduler", "SchedulerOutput"]
