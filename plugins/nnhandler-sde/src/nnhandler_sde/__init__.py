"""Score-based generative modelling with nnhandler.

* :class:`VPSDE`, :class:`VESDE` — forward SDEs with Gaussian marginals;
* :class:`NoisedDataset` + :class:`DenoisingScoreMatchingLoss` — denoising score matching with
  nnhandler's ``loss(output, target)`` interface (the model is ``model(x_t, t)``);
* :class:`EulerMaruyamaSampler` — reverse-time sampling, optionally with a Langevin corrector;
* :class:`ScoreSDE` — a callback that keeps SDE/sampler configuration, the sampling random
  stream and the count of samples drawn in every checkpoint.

The package is an nnhandler plugin (entry-point group ``nnhandler.plugins``, see
:mod:`nnhandler_sde.plugin`) and uses only nnhandler's public API.
"""

from .callback import STATE_KEY, ScoreSDE, find_score_sde
from .loss import DenoisingScoreMatchingLoss, NoisedDataset
from .sampler import EulerMaruyamaSampler, ScoreFunction
from .sde import SDE, VESDE, VPSDE, sde_from_config

__version__ = "0.1.0"

__all__ = [
    "SDE",
    "STATE_KEY",
    "VESDE",
    "VPSDE",
    "DenoisingScoreMatchingLoss",
    "EulerMaruyamaSampler",
    "NoisedDataset",
    "ScoreFunction",
    "ScoreSDE",
    "__version__",
    "find_score_sde",
    "sde_from_config",
]
