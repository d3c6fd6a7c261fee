"""A PyTorch VQ-VAE of exactly minivq's architecture: the peer for speed and quality comparisons.

Only the benchmarks import this (PyTorch is never a minivq dependency). The
layers, their order, initialisation and the loss are the same as in
minivq.models.VQVAE, so a step of one is comparable with a step of the other.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Residual(nn.Module):
    def __init__(self, channels, hidden):
        super().__init__()
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, hidden, 3, padding=1, bias=False),
                                   nn.ReLU(), nn.Conv2d(hidden, channels, 1, bias=False))

    def forward(self, x):
        return x + self.block(x)


class ResidualStack(nn.Module):
    def __init__(self, channels, hidden, num_layers):
        super().__init__()
        self.layers = nn.Sequential(*[Residual(channels, hidden) for _ in range(num_layers)])

    def forward(self, x):
        return F.relu(self.layers(x))


class VectorQuantizer(nn.Module):
    def __init__(self, num_embeddings, embedding_dim, commitment_cost):
        super().__init__()
        self.codebook = nn.Parameter(torch.empty(num_embeddings, embedding_dim).uniform_(
            -1 / num_embeddings, 1 / num_embeddings))
        self.commitment_cost = commitment_cost

    def forward(self, z_e):
        n, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        with torch.no_grad():   # the GEMM expansion; ||x||^2 does not change the argmin
            dist = (self.codebook ** 2).sum(1)[None, :] - 2 * flat @ self.codebook.t()
            indices = dist.argmin(1)
        z_q = self.codebook[indices].view(n, h, w, d).permute(0, 3, 1, 2)
        loss = F.mse_loss(z_q, z_e.detach()) + self.commitment_cost * F.mse_loss(z_e, z_q.detach())
        quantized = z_e + (z_q - z_e).detach()
        counts = torch.bincount(indices, minlength=self.codebook.shape[0]).double()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        return quantized, loss, indices.view(n, h, w), perplexity


class VQVAE(nn.Module):
    def __init__(self, in_channels=1, num_hiddens=128, num_residual_hiddens=32, num_residual_layers=2,
                 embedding_dim=64, num_embeddings=512, commitment_cost=0.25):
        super().__init__()
        h = num_hiddens
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, h // 2, 4, 2, 1), nn.ReLU(), nn.Conv2d(h // 2, h, 4, 2, 1), nn.ReLU(),
            nn.Conv2d(h, h, 3, padding=1), ResidualStack(h, num_residual_hiddens, num_residual_layers),
            nn.Conv2d(h, embedding_dim, 1))
        self.vq = VectorQuantizer(num_embeddings, embedding_dim, commitment_cost)
        self.decoder = nn.Sequential(
            nn.Conv2d(embedding_dim, h, 3, padding=1), ResidualStack(h, num_residual_hiddens, num_residual_layers),
            nn.ConvTranspose2d(h, h // 2, 4, 2, 1), nn.ReLU(), nn.ConvTranspose2d(h // 2, in_channels, 4, 2, 1))

    def forward(self, x):
        quantized, vq_loss, indices, perplexity = self.vq(self.encoder(x))
        return self.decoder(quantized), vq_loss, indices, perplexity


def train_step(model, optimizer, x, variance):
    x_recon, vq_loss, _, perplexity = model(x)
    loss = F.mse_loss(x_recon, x) / variance + vq_loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss, perplexity
