"""Training fixtures for src/autograd: a small two-layer network's gradients by torch autograd, and
a 50-step AdamW run with gradient clipping, for the engine to repeat (tests in src/autograd); and a
small convolutional network's gradients.

mlp.json: `mse(linear(s * s + s), target)` with `s = silu(linear(x))` (linear with bias, SiLU,
elementwise product and sum, MSE). convnet.json: `mse(conv(silu(group_norm(conv(x)))), target)`, the
first convolution 3x3 padded, the second 3x3 with stride 2 (a UNet's downsampler), group norm in
two groups. blocks.json: a UNet's up path in small, `mse(0.5 conv(concat(up(h), up(x))), target)`
with `h = conv(x) + linear(silu(temb))` per channel (nearest 2x upsampling, channel concatenation,
a timestep embedding added per channel, an output scale). attention.json: one attention head over
layer-normalised tokens, `mse(linear(gelu(softmax(q kᵀ / 2) v)), target)` with q, k, v linear maps
of layer_norm(x).
Float32 values as JSON numbers.
"""
import json
import os

import torch

ROWS, D_IN, D_HID, D_OUT = 5, 7, 6, 3
STEPS, LR, WEIGHT_DECAY, MAX_NORM = 50, 0.02, 0.01, 1.0


def forward(x, w1, b1, w2, b2, target):
    s = torch.nn.functional.silu(torch.nn.functional.linear(x, w1, b1))
    y = torch.nn.functional.linear(s * s + s, w2, b2)
    return torch.nn.functional.mse_loss(y, target)


def write(name, out):
    """tests/fixtures/autograd/NAME.json; returns its path."""
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "autograd", f"{name}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=None, separators=(",", ":"))
        f.write("\n")
    return path


def write_case(name, inputs, target, loss, leaves):
    """NAME.json of a network's inputs and weights, target, loss and torch's gradients."""
    out = {
        "shapes": [list(t.shape) for t in inputs], "values": [values(t) for t in inputs],
        "target_shape": list(target.shape), "target": values(target),
        "loss": float(loss.detach()), "grads": [values(t.grad) for t in leaves],
    }
    path = write(name, out)
    print(f"wrote {os.path.normpath(path)}: loss {float(loss.detach()):.5f}")


def values(t):
    return [float(v) for v in t.detach().reshape(-1).tolist()]


def main():
    torch.manual_seed(20)
    x = torch.randn(ROWS, D_IN) * 0.7
    params = [torch.randn(D_HID, D_IN) * 0.5, torch.randn(D_HID) * 0.5, torch.randn(D_OUT, D_HID) * 0.5, torch.randn(D_OUT) * 0.5]
    target = torch.randn(ROWS, D_OUT)
    init = [p.clone() for p in params]

    # Gradients at the start, x included.
    leaves = [t.clone().requires_grad_(True) for t in [x] + params]
    loss = forward(*leaves, target)
    loss.backward()

    # Training: x and the target are data; AdamW over the weights, gradients clipped first.
    weights = [p.clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(weights, lr=LR, weight_decay=WEIGHT_DECAY, foreach=False)
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad()
        step_loss = forward(x, *weights, target)
        step_loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(weights, MAX_NORM)))
        opt.step()
        losses.append(float(step_loss.detach()))

    out = {
        "shapes": [list(x.shape)] + [list(p.shape) for p in params],
        "x": values(x), "params": [values(p) for p in init], "target": values(target),
        "loss": float(loss.detach()), "grads": [values(t.grad) for t in leaves],
        "train": {"steps": STEPS, "lr": LR, "weight_decay": WEIGHT_DECAY, "max_norm": MAX_NORM,
                  "losses": losses, "grad_norms": norms, "final": [values(w) for w in weights]},
        "torch": torch.__version__.split("+")[0],
    }
    path = write("mlp", out)
    print(f"wrote {os.path.normpath(path)}: loss {losses[0]:.5f} -> {losses[-1]:.5f} in {STEPS} steps")


def convnet():
    torch.manual_seed(22)
    x = torch.randn(2, 3, 7, 6)
    params = [torch.randn(4, 3, 3, 3) * 0.4, torch.randn(4) * 0.3, 1.0 + 0.2 * torch.randn(4), 0.2 * torch.randn(4),
              torch.randn(2, 4, 3, 3) * 0.4, torch.randn(2) * 0.3]
    target = torch.randn(2, 2, 4, 3)
    leaves = [t.clone().requires_grad_(True) for t in [x] + params]
    x_, w1, b1, gamma, beta, w2, b2 = leaves
    h = torch.nn.functional.conv2d(x_, w1, b1, padding=1)
    h = torch.nn.functional.silu(torch.nn.functional.group_norm(h, 2, gamma, beta, eps=1e-5))
    y = torch.nn.functional.conv2d(h, w2, b2, stride=2, padding=1)
    loss = torch.nn.functional.mse_loss(y, target)
    loss.backward()
    write_case("convnet", [x] + params, target, loss, leaves)


def blocks():
    torch.manual_seed(23)
    x = torch.randn(2, 3, 4, 5)
    temb = torch.randn(2, 6)
    params = [torch.randn(4, 3, 3, 3) * 0.4, torch.randn(4) * 0.3, torch.randn(4, 6) * 0.4, torch.randn(2, 7, 3, 3) * 0.3, torch.randn(2) * 0.3]
    target = torch.randn(2, 2, 8, 10)
    leaves = [t.clone().requires_grad_(True) for t in [x, temb] + params]
    x_, temb_, w1, b1, wt, w2, b2 = leaves
    up = lambda t: torch.nn.functional.interpolate(t, scale_factor=2.0, mode="nearest")
    h = torch.nn.functional.conv2d(x_, w1, b1, padding=1)
    h = h + torch.nn.functional.linear(torch.nn.functional.silu(temb_), wt)[:, :, None, None]
    c = torch.cat([up(h), up(x_)], dim=1)
    y = 0.5 * torch.nn.functional.conv2d(c, w2, b2, padding=1)
    loss = torch.nn.functional.mse_loss(y, target)
    loss.backward()
    write_case("blocks", [x, temb] + params, target, loss, leaves)


def attention():
    torch.manual_seed(24)
    x = torch.randn(2, 5, 6)
    params = [torch.randn(4, 6) * 0.5, torch.randn(4, 6) * 0.5, torch.randn(4, 6) * 0.5, torch.randn(6, 4) * 0.5,
              1.0 + 0.2 * torch.randn(6), 0.2 * torch.randn(6)]
    target = torch.randn(2, 5, 6)
    leaves = [t.clone().requires_grad_(True) for t in [x] + params]
    x_, wq, wk, wv, wo, gamma, beta = leaves
    lin = torch.nn.functional.linear
    h = torch.nn.functional.layer_norm(x_, (6,), gamma, beta, eps=1e-5)
    q, k, v = lin(h, wq), lin(h, wk), lin(h, wv)
    p = torch.softmax(q @ k.transpose(1, 2) * 0.5, dim=-1)
    y = lin(torch.nn.functional.gelu(p @ v), wo)
    loss = torch.nn.functional.mse_loss(y, target)
    loss.backward()
    write_case("attention", [x] + params, target, loss, leaves)


if __name__ == "__main__":
    main()
    convnet()
    blocks()
    attention()
