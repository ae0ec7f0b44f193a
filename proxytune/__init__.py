"""proxytune: proxy-tuning (Liu et al. 2024) — steer a large model with a small tuned/untuned pair."""
from .decode import Event, GenerationOutput, Request, StepDetail
from .errors import ProxyTuneError
from .proxy import ExpertPair, combined_logits
from .sampling import SamplingParams
from .tuner import ProxyTuner, Score

__all__ = ["ProxyTuner", "ProxyTuneError", "GenerationOutput", "Score", "StepDetail", "Event", "Request",
           "SamplingParams", "ExpertPair", "combined_logits"]
__version__ = "0.1.0"
