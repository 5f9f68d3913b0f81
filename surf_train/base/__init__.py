"""Frozen flow-matching video DiTs behind one small interface (see `BaseModel`)."""
from surf_train.base.adapter import BaseModel, BaseSpec, Cond, LatentGeometry, load_base_model

__all__ = ["BaseModel", "BaseSpec", "Cond", "LatentGeometry", "load_base_model"]
