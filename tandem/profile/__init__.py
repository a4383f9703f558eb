"""Performance profiles: `tandem profile` measures a model on a GPU; the planner and the simulator
read the result. This package's top level is torch-free (schema only)."""
from tandem.profile.schema import Profile, find_knee, interp1

__all__ = ["Profile", "find_knee", "interp1"]
