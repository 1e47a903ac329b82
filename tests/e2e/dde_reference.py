"""An independent float64 reading of docs/method.md, used to check what the
C++ trainer logs (per-pair records, correction_ema.json). Plain numpy, no torch."""

from __future__ import annotations

import math

import numpy as np

DPO_METHODS = ("uniform", "discounted", "dde_single", "dde_step", "dde")
REFERENCE_FREE = ("sft", "mapo")  # no reference model: no Delta, no correction
ALL_METHODS = ("sft",) + DPO_METHODS + ("mapo",)


def schedule(T: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> dict[str, np.ndarray]:
    """Section 1 and 2: beta, alpha, abar, c_t and lambda_t tables."""
    betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    return {
        "betas": betas,
        "alphas": alphas,
        "abar": abar,
        "c": (1.0 - abar) / abar,
        "lambda": betas / (alphas * (1.0 - abar)),
    }


def mapo_f(x: float) -> float:
    """Section 8.1: x / (e^x - 1), 1 at 0."""
    return 1.0 if x == 0.0 else x / math.expm1(x)


def mapo_z(rec: dict, snr: float = 0.5, T: int = 1000) -> float:
    """Section 8.1: T * margin, margin = f(s e_w) - f(s e_l) (the argument of log sigmoid)."""
    return T * (mapo_f(snr * rec["mse_policy_w"]) - mapo_f(snr * rec["mse_policy_l"]))


def pair_z(method: str, rec: dict, tables: dict[str, np.ndarray], beta: float = 5000.0, s: float = 1.0) -> float:
    """Section 3: z of one per-pair record (keys mse_policy_w, ..., t, correction)."""
    if method == "mapo":
        return mapo_z(rec)
    delta = (rec["mse_policy_w"] - rec["mse_ref_w"]) - (rec["mse_policy_l"] - rec["mse_ref_l"])
    t = rec["t"]
    if method in ("uniform", "discounted"):
        return -0.5 * beta * delta
    if method == "dde_single":
        return -0.5 * beta * tables["c"][t] * delta
    if method == "dde_step":
        return -0.5 * beta * tables["lambda"][t] * delta + beta * s * rec["correction"]
    if method == "dde":
        return -0.5 * beta * tables["c"][t] * delta + beta * s * rec["correction"]
    raise ValueError(method)


def softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def pair_loss(method: str, rec: dict, tables: dict[str, np.ndarray], beta: float = 5000.0) -> float:
    if method == "sft":
        return rec["mse_policy_w"]
    if method == "mapo":  # section 8.1, MaPO's defaults b = 0.1, s = 0.5
        return rec["mse_policy_w"] + 0.1 * softplus(-mapo_z(rec))
    return softplus(-pair_z(method, rec, tables, beta))


def replay_correction(records: list[dict], tables: dict[str, np.ndarray], T: int, momentum: float) -> np.ndarray:
    """Section 4: E after replaying the delayed update step by step from per-pair records."""
    E = np.zeros(T, dtype=np.float64)
    by_step: dict[int, list[dict]] = {}
    for rec in records:
        by_step.setdefault(rec["step"], []).append(rec)
    for step in sorted(by_step):
        sums = np.zeros(T)
        counts = np.zeros(T)
        for rec in by_step[step]:
            delta = (rec["mse_policy_w"] - rec["mse_ref_w"]) - (rec["mse_policy_l"] - rec["mse_ref_l"])
            sums[rec["t"]] += -0.5 * tables["lambda"][rec["t"]] * delta
            counts[rec["t"]] += 1
        seen = counts > 0
        E[seen] = momentum * E[seen] + (1.0 - momentum) * sums[seen] / counts[seen]
    return E


def correction_of(E: np.ndarray, t: int) -> float:
    """C_t = sum_{k=t+1}^{T-1} E[k]."""
    return float(E[t + 1:].sum())
