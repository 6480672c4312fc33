"""Vanishing gradients, measured: how much gradient reaches each time step of an RNN, an LSTM and a GRU.

For each recurrent layer (seqfast's drop-in modules, default torch initialisation) the loss is a function of the last
output only; the plot shows the norm of d loss / d x_t for every input step t, against the distance from the end.
Every curve decays geometrically; the plot shows how fast (a tanh RNN fastest, an LSTM whose forget gate starts open
slowest).

    python examples/gradient_flow.py --steps 150 --out examples/results
"""
import argparse
import json
import os

import torch

import seqfast


CURVES = {"RNN (tanh)": ("RNN", False), "LSTM": ("LSTM", False), "GRU": ("GRU", False),
          "LSTM, forget-gate bias 1": ("LSTM", True)}


def gradient_per_step(kind, forget_bias, steps, input_size, hidden, batch, seeds, impl):
    """Mean over seeds of ||d loss / d x_t|| (averaged over the batch), t = 0..steps-1; loss = sum of the last output.
    float64, so that gradients far below float32's range are still measured rather than flushed to zero."""
    nn = seqfast.nn if impl == "seqfast" else torch.nn
    total = torch.zeros(steps, dtype=torch.float64)
    for seed in range(seeds):
        torch.manual_seed(seed)
        layer = getattr(nn, kind)(input_size, hidden).double()
        if forget_bias:  # the usual remedy (Gers et al. 2000; Jozefowicz et al. 2015): start with the forget gate open
            with torch.no_grad():
                layer.bias_ih_l0[hidden:2 * hidden] = 1.0
                layer.bias_hh_l0[hidden:2 * hidden] = 0.0
        x = torch.randn(steps, batch, input_size, dtype=torch.float64, requires_grad=True)
        out, _ = layer(x)
        out[-1].sum().backward()
        total += x.grad.norm(dim=-1).mean(dim=-1).double()
    return (total / seeds).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--impl", choices=["seqfast", "torch"], default="seqfast")
    parser.add_argument("--out", default="examples/results")
    args = parser.parse_args(argv)

    norms = {name: gradient_per_step(kind, forget_bias, args.steps, args.hidden, args.hidden, args.batch, args.seeds,
                                     args.impl)
             for name, (kind, forget_bias) in CURVES.items()}
    for kind, g in norms.items():
        at = {d: g[args.steps - 1 - d] for d in (0, 10, 50, args.steps - 1) if d < args.steps}
        print(f"{kind:25s} ||dL/dx_t|| at {', '.join(f'{d} steps back: {v:.2e}' for d, v in at.items())}")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    back = list(range(args.steps))
    for kind, g in norms.items():
        ax.semilogy(back, [max(v, 1e-45) for v in reversed(g)], label=f"{kind}")
    ax.set_xlabel("steps back from the last output")
    ax.set_ylabel("||d loss / d x_t|| (mean over batch and seeds)")
    ax.set_title(f"Gradient reaching each input step ({args.impl}, hidden {args.hidden})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, "gradient_flow.png"), dpi=110)
    plt.close(fig)
    with open(os.path.join(args.out, "gradient_flow.json"), "w") as f:
        json.dump({"impl": args.impl, "hidden": args.hidden, "steps": args.steps, "norm_per_step": norms}, f)
    return norms


if __name__ == "__main__":
    main()
