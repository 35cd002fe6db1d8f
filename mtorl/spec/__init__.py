"""Job specs: typed, validated at the edge."""

from mtorl.spec.loader import SpecError, apply_overrides, job_to_dict, job_to_yaml, load_job, make_job, validate_doc
from mtorl.spec.models import (
    API_VERSION, DecisionSpec, EvaluateJob, EvaluateSpec, ModelSpec, ObjectiveSpec, PrepareJob, PrepareSpec, ServeJob, ServeSpec,
    SimulateJob, SimulateSpec, TrainJob, TrainerSpec, TrainSpec, TuneJob, TuneSpec, WindowSpec,
)

__all__ = [
    "API_VERSION", "DecisionSpec", "EvaluateJob", "EvaluateSpec", "ModelSpec", "ObjectiveSpec", "PrepareJob", "PrepareSpec", "ServeJob",
    "ServeSpec", "SimulateJob", "SimulateSpec", "SpecError", "TrainJob", "TrainerSpec", "TrainSpec", "TuneJob", "TuneSpec",
    "WindowSpec", "apply_overrides", "job_to_dict", "job_to_yaml", "load_job", "make_job", "validate_doc",
]
