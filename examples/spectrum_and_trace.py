"""Trace, spectral density and Gauss-Newton: curvature beyond λ_max for a small network.

Hutch++ estimates the trace with Rademacher probes (32 per data pass); a budget of at least n products gives
the exact trace. Stochastic Lanczos quadrature gives the spectral density, plotted Gaussian-smoothed on a log
scale. The Gauss-Newton part G of the Hessian has its own operator. Saves `density.png`.
"""
import matplotlib.pyplot as plt
import torch
from torch import nn

import fasthess

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 3)).double()
X, y = torch.randn(256, 10, dtype=torch.float64), torch.randint(0, 3, (256,))
loss_fn = nn.CrossEntropyLoss()
H = fasthess.HessianOperator(model, loss_fn, (X, y), batch_size=128)
print(H.num_params, "parameters")

print(fasthess.trace(H, num_matvecs=60))            # Hutch++
print(fasthess.trace(H, num_matvecs=H.num_params))  # budget >= n: exact
dens = fasthess.spectral_density(H, num_probes=6, lanczos_steps=30)
print(f"tr/n ≈ {dens.mean:.4f} ± {dens.moment_std_error(1):.4f}; eigenvalues in "
      f"[{dens.nodes.min():.4f}, {dens.nodes.max():.4f}]; {dens.num_hvps} HVPs in {dens.num_passes} passes")

G = fasthess.GGNOperator(model, loss_fn, (X, y), batch_size=128)
print(f"λ_max(H) = {float(fasthess.eigs(H, k=1).eigenvalues[0]):.6f}, "
      f"λ_max(GGN) = {float(fasthess.eigs(G, k=1).eigenvalues[0]):.6f}")

ax = dens.plot()
ax.set_title("Hessian spectral density (stochastic Lanczos quadrature)")
ax.figure.tight_layout()
ax.figure.savefig("density.png", dpi=110)
