"""Frozen flow-matching video DiTs behind one small interface (see `BaseModel`)."""
from surf_train.base.adapter import (Acceleration, BaseModel, BaseSpec, Cond, LatentGeometry, Meter,
                                     load_base_model)

__all__ = ["Acceleration", "BaseModel", "BaseSpec", "Cond", "LatentGeometry", "Meter", "load_base_model"]
