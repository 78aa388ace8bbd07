"""PyTorch adapters (``import hashemb.torch`` imports torch; ``import hashemb``
never does). Modules behave like ``torch.nn.EmbeddingBag``; every lookup and
gradient runs in hashemb's kernels, tensors are shared with them through
DLPack without copies. CPU tensors today; CUDA tensors need the CuPy backend.
"""
from .fast import FastEmbedding, FastMultiEmbedding
from .modules import (HashEmbeddingBag, HashEmbeddingBagCollection, HashedEmbeddingBag,
                      HashedNetEmbeddingBagCollection, HashingTrickEmbeddingBagCollection,
                      LSHEmbeddingBag, LSHEmbeddingBagCollection,
                      RobeEmbeddingBag, RobeEmbeddingBagCollection,
                      TorchEmbeddingBagCollection, dense_parameters)

__all__ = ["HashEmbeddingBag", "HashEmbeddingBagCollection", "RobeEmbeddingBag",
           "RobeEmbeddingBagCollection", "HashedEmbeddingBag",
           "HashedNetEmbeddingBagCollection", "HashingTrickEmbeddingBagCollection",
           "TorchEmbeddingBagCollection", "dense_parameters", "FastEmbedding",
           "FastMultiEmbedding", "LSHEmbeddingBag", "LSHEmbeddingBagCollection"]
from .dlrm import DLRM, METHODS, evaluate, make_embedding, train_epoch  # noqa: E402
from .tt import TTEmbeddingBag, TTEmbeddingBagCollection  # noqa: E402

__all__ += ["DLRM", "METHODS", "evaluate", "make_embedding", "train_epoch"]
__all__ += ["TTEmbeddingBag", "TTEmbeddingBagCollection"]
