"""``Embedding``: a lookup table of learned vectors."""
import numpy as np

from .. import backend
from ..functional import embedding
from .module import Module, Parameter


class Embedding(Module):
    """``weight[indices]`` with weight (num_embeddings, embedding_dim) ~ N(0, 1), as PyTorch initialises it."""

    def __init__(self, num_embeddings, embedding_dim):
        super().__init__()
        if int(num_embeddings) < 1 or int(embedding_dim) < 1:
            raise ValueError(f"num_embeddings and embedding_dim must be >= 1, got {num_embeddings}, {embedding_dim}")
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        self.weight = Parameter(backend.rng().standard_normal((self.num_embeddings, self.embedding_dim))
                                .astype(np.float32))

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}"

    def forward(self, indices):
        return embedding(indices, self.weight)
