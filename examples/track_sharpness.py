"""Tracking λ_max during training: full-batch gradient descent climbs to the edge of stability 2/η.

A small MLP on 256 of scikit-learn's digits, trained on the squared loss by full-batch gradient descent with
learning rate η = 1. A `fasthess.SharpnessTracker` computes the exact, certified λ_max of the training loss every 25
steps. λ_max rises during training ("progressive sharpening") until it
reaches 2/η, where gradient descent stops being stable in the top direction, and then hovers there (Cohen et
al. 2021). Saves `sharpness.png`.
"""
import matplotlib.pyplot as plt
import torch
from sklearn.datasets import load_digits
from torch import nn

import fasthess

torch.manual_seed(0)
digits = load_digits()
X = torch.tensor(digits.data[:256], dtype=torch.float32) / 16.0
y = nn.functional.one_hot(torch.tensor(digits.target[:256]), 10).float()
model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))
loss_fn = nn.MSELoss()
lr = 1.0
opt = torch.optim.SGD(model.parameters(), lr=lr)
tracker = fasthess.SharpnessTracker(loss_fn, (X, y), every=25, lr=lr)

losses = []
for step in range(301):
    rec = tracker.maybe_update(model, step, optimizer=opt)
    if rec is not None and step % 50 == 0:
        print(f"step {step:3d}  loss {loss_fn(model(X), y).item():.4f}  λ_max {rec.lambda_max:.4f}  "
              f"({rec.threshold_rule} = {rec.threshold:.1f}; residual {rec.residual:.1e}, {rec.num_hvps} HVPs"
              f"{'; overlap with the previous top eigenvector %.2f' % rec.top_overlap if rec.top_overlap else ''})")
    opt.zero_grad()
    loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())

hvps = sum(r.num_hvps for r in tracker.history)
print(f"{len(tracker.history)} solves, {hvps} Hessian-vector products in all "
      f"({hvps / len(tracker.history):.1f} per solve)")

steps = [r.step for r in tracker.history]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.2))
ax1.plot(losses)
ax1.set(xlabel="step", ylabel="training loss", yscale="log")
ax2.plot(steps, [r.lambda_max for r in tracker.history], "o-", label="λ_max (exact, full data)")
ax2.axhline(2 / lr, color="k", ls="--", label="2/η")
ax2.set(xlabel="step", ylabel="sharpness")
ax2.legend()
fig.tight_layout()
fig.savefig("sharpness.png", dpi=110)
