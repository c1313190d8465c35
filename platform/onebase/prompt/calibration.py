"""Contextual calibration (Zhao et al. 2021, "Calibrate Before Use").

Score content-free inputs ("N/A", "", "[MASK]") with the same prompt, average their normalised
label probabilities into p_cf, then predict argmax(diag(p_cf)^-1 p) — renormalised here so the
calibrated scores are probabilities again.
"""

from __future__ import annotations

import torch


def label_probs(label_scores: list[list[float]]) -> list[list[float]]:
    """Per query, softmax over the labels' log-likelihoods."""
    return torch.softmax(torch.tensor(label_scores, dtype=torch.float64), dim=-1).tolist()


def content_free_probs(probs: list[list[float]]) -> list[float]:
    """p_cf: the mean of the content-free inputs' label probabilities, normalised."""
    mean = torch.tensor(probs, dtype=torch.float64).mean(0)
    return (mean / mean.sum()).tolist()


def calibrate(probs: list[list[float]], p_cf: list[float]) -> list[list[float]]:
    weighted = torch.tensor(probs, dtype=torch.float64) / torch.tensor(p_cf, dtype=torch.float64)
    return (weighted / weighted.sum(-1, keepdim=True)).tolist()
