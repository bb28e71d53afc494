"""stepdistill: distil Diffusers text-to-image models into few-step or guidance-free students."""

from .api import train
from .errors import StepdistillError
from .recipe import Recipe, load
from .teacher import Conditioning, Teacher

__version__ = "0.1.0"
__all__ = ["Conditioning", "Recipe", "StepdistillError", "Teacher", "load", "train", "__version__"]
