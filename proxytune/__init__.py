"""proxytune: proxy-tuning (Liu et al. 2024) — steer a large model with a small tuned/untuned pair."""
from .engine.decoding import Event, GenerationOutput, Request, StepDetail
from .errors import ProxyTuneError
from .engine.combine import combined_logits
from .engine.roles import ExpertPair, Role, Roles
from .engine.sampling import SamplingParams
from .engine.settings import Settings
from .engine.shaping import Shaping
from .facade.tuner import ProxyTuner, Score

__all__ = ["ProxyTuner", "ProxyTuneError", "GenerationOutput", "Score", "StepDetail", "Event", "Request", "Role", "Roles",
           "SamplingParams", "Settings", "Shaping", "ExpertPair", "combined_logits"]
__version__ = "0.1.0"
