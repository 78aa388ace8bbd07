"""Data: the synthetic Criteo-shaped generator (the default everywhere), a
streaming Criteo TSV reader and the MovieLens-100k click loader."""
from .criteo import CriteoTSV
from .movielens import load_movielens
from .synthetic import CRITEO_KAGGLE, NUM_DENSE, Batch, SyntheticCriteo

__all__ = ["CRITEO_KAGGLE", "NUM_DENSE", "Batch", "SyntheticCriteo", "CriteoTSV",
           "load_movielens"]
