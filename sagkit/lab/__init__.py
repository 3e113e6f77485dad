"""The lab around the library: the studies behind the notebooks and the report (misalignment,
convergence, benchmarks, profiling, guidance evaluation), their figures, ``sagkit report`` and
the ``sagkit`` command line.

    import sagkit as sk
    table = sk.lab.misalignment(model, classifier)
"""

from .convergence import convergence_study
from .evaluation import evaluate_guidance
from .misalignment import misalignment
from .profiling import ProfileReport, profile, profile_gradient

__all__ = [
    "misalignment",
    "convergence_study",
    "evaluate_guidance",
    "profile",
    "profile_gradient",
    "ProfileReport",
]
