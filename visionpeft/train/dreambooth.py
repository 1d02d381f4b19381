"""Moved to `visionpeft.pipelines.dreambooth`. This module only keeps the old import path
(`from visionpeft.train.dreambooth import DreamBoothTask`) working, with a warning; it
will go in a later release."""
import warnings

from ..pipelines.dreambooth import *  # noqa: F401,F403
from ..pipelines.dreambooth import __all__  # noqa: F401

warnings.warn("visionpeft.train.dreambooth moved: import from visionpeft.pipelines.dreambooth",
              DeprecationWarning, stacklevel=2)
