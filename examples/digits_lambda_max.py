"""λ_max of an MLP on digits: the top three eigenvalues of the full-data Hessian, with their certificates.

A small MLP is trained on scikit-learn's digits (1,797 examples) for 200 full-batch steps; then
`fasthess.eigs` finds the top three eigenvalues of the Hessian of the training loss over all of the data, each
with its residual ‖Hx − θx‖ and error bound. The last line compares the solve with the cost of one full-data
gradient.
"""
import time

import torch
from sklearn.datasets import load_digits
from torch import nn

import fasthess

torch.manual_seed(0)
digits = load_digits()
X = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 10))
loss_fn = nn.CrossEntropyLoss()

opt = torch.optim.SGD(model.parameters(), lr=0.5)
for _ in range(200):  # a little full-batch training so the Hessian is not that of a random network
    opt.zero_grad()
    loss_fn(model(X), y).backward()
    opt.step()

print(fasthess.backend(), "backend;", sum(p.numel() for p in model.parameters()), "parameters;", len(X), "examples")
op = fasthess.HessianOperator(model, loss_fn, (X, y), batch_size=512)
res = fasthess.eigs(op, k=3, tol=1e-6)
print(res)
print("residuals:", [f"{r:.2e}" for r in res.residuals.tolist()])

t = time.perf_counter()
model.zero_grad()
loss_fn(model(X), y).backward()
grad_s = time.perf_counter() - t
print(f"one full-data gradient: {grad_s * 1e3:.1f} ms; λ_max solve = {res.seconds / grad_s:.0f} gradient-equivalents")
