"""Physico-chemical residue descriptors as an embedding: similar residues get similar vectors.

Registered as `physchem`: five standardised descriptors per residue (hydrophobicity, volume,
charge, polarity, aromaticity), optionally followed by the one-hot. Values from the literature:
Kyte & Doolittle 1982 (hydrophobicity), Zamyatnin 1972 (volume, Å^3), Grantham 1974 (polarity),
side-chain charge at pH 7.

    {"embeddings": {"name": "physchem", "params": {"with_onehot": true}}}
"""

import torch
from torch import nn

from runner.core.embeddings import register_embedding, vocab_alphabet

DESCRIPTORS = {  # residue: (hydrophobicity, volume, charge, polarity, aromatic)
    "A": (1.8, 88.6, 0.0, 8.1, 0.0),
    "R": (-4.5, 173.4, 1.0, 10.5, 0.0),
    "N": (-3.5, 114.1, 0.0, 11.6, 0.0),
    "D": (-3.5, 111.1, -1.0, 13.0, 0.0),
    "C": (2.5, 108.5, 0.0, 5.5, 0.0),
    "Q": (-3.5, 143.8, 0.0, 10.5, 0.0),
    "E": (-3.5, 138.4, -1.0, 12.3, 0.0),
    "G": (-0.4, 60.1, 0.0, 9.0, 0.0),
    "H": (-3.2, 153.2, 0.1, 10.4, 1.0),
    "I": (4.5, 166.7, 0.0, 5.2, 0.0),
    "L": (3.8, 166.7, 0.0, 4.9, 0.0),
    "K": (-3.9, 168.6, 1.0, 11.3, 0.0),
    "M": (1.9, 162.9, 0.0, 5.7, 0.0),
    "F": (2.8, 189.9, 0.0, 5.2, 1.0),
    "P": (-1.6, 112.7, 0.0, 8.0, 0.0),
    "S": (-0.8, 89.0, 0.0, 9.2, 0.0),
    "T": (-0.7, 116.1, 0.0, 8.6, 0.0),
    "W": (-0.9, 227.8, 0.0, 5.4, 1.0),
    "Y": (-1.3, 193.6, 0.0, 6.2, 1.0),
    "V": (4.2, 140.0, 0.0, 5.9, 0.0),
}


class DescriptorEmbedding(nn.Module):
    """Fixed lookup table: token id → descriptor vector (zeros for padding, stop and unknown letters)."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.register_buffer("table", table)
        self.dim = int(table.shape[1])

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table[tokens.long()]


@register_embedding("physchem")
def physchem(vocab, with_onehot: bool = False) -> nn.Module:
    alphabet = vocab_alphabet(vocab)  # index = token id; "" is padding
    values = torch.tensor(list(DESCRIPTORS.values()))
    mean, std = values.mean(0), values.std(0)
    table = torch.zeros(len(alphabet), values.shape[1])
    for token_id, letter in enumerate(alphabet):
        if letter.upper() in DESCRIPTORS:
            table[token_id] = (torch.tensor(DESCRIPTORS[letter.upper()]) - mean) / std
    if with_onehot:
        onehot = torch.eye(len(alphabet))
        onehot[0, 0] = 0.0
        table = torch.cat([table, onehot], dim=1)
    return DescriptorEmbedding(table)
