"""Practitioners' sanity checks before a long run.

    python -m pipeline_src.sanity overfit  [--run NAME]   # one batch to near-zero loss, else exit 1
    python -m pipeline_src.sanity lr-range [--run NAME]   # LR range test: plot + suggested LR
    python -m pipeline_src.sanity geometry [--run NAME]   # feature-map sizes, input reach at init

A model that cannot memorise one batch has a bug (wrong labels, frozen layers, broken loss); the LR
range test (Smith 2017) sweeps the LR exponentially and suggests one a little below the divergence.
Its plot and curve go to <paths.reports>/sanity/ and to an MLflow run `sanity-lr-range/<run>`.
The geometry check catches inputs too small for the stem: it prints each stage's feature-map side
and the share of input pixels whose gradient reaches the logits at initialisation (with zero gamma
only the shortcuts carry signal then, and strided 1x1 shortcuts see only every other pixel).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from pipeline_src import params as params_mod, tracking
from pipeline_src.engine import betons_dir, build_optimizer, read_classes
from pipeline_src.errors import run_main
from pipeline_src.io import atomic_path, write_json
from pipeline_src.loader import make_train_loader
from pipeline_src.models import build_model
from pipeline_src.tricks.label_smoothing import smooth_targets, soft_target_cross_entropy


def _setup(params: dict, seed: int) -> tuple[torch.nn.Module, object, int]:
    torch.manual_seed(seed)
    num_classes = len(read_classes(params))
    model = build_model(params["model"], num_classes)
    loader = make_train_loader(betons_dir(params) / "train.beton", params, params["train"]["batch_size"], seed,
                               torch.device("cpu"))
    return model, loader, num_classes


def overfit(params: dict, seed: int) -> tuple[bool, list[float]]:
    """Train on one fixed batch (no label smoothing: the target is zero loss)."""
    model, loader, num_classes = _setup(params, seed)
    images, labels = next(iter(loader))
    targets = smooth_targets(labels, num_classes, 0.0)
    optimizer = build_optimizer(model, params["train"], params["train"]["base_lr"])
    model.train()
    losses = []
    for _ in range(params["sanity"]["overfit_steps"]):
        loss = soft_target_cross_entropy(model(images), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if loss.item() <= params["sanity"]["overfit_loss"]:
            return True, losses
    return False, losses


def lr_range(params: dict, seed: int) -> dict:
    """Exponential LR sweep over successive batches; stops once the smoothed loss explodes."""
    model, loader, num_classes = _setup(params, seed)
    low, high = params["sanity"]["lr_range"]
    steps = params["sanity"]["lr_range_steps"]
    optimizer = build_optimizer(model, params["train"], low)
    eps = params["train"]["label_smoothing"]
    model.train()
    lrs, losses, smooth, best = [], [], None, math.inf
    batches = iter(())
    for step in range(steps):
        try:
            images, labels = next(batches)
        except StopIteration:
            batches = iter(loader)
            images, labels = next(batches)
        lr = low * (high / low) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = soft_target_cross_entropy(model(images), smooth_targets(labels, num_classes, eps))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        smooth = loss.item() if smooth is None else 0.9 * smooth + 0.1 * loss.item()
        lrs.append(lr)
        losses.append(smooth)
        best = min(best, smooth)
        if not math.isfinite(smooth) or smooth > 4 * best:
            break
    # Suggest the LR of the steepest descent of the smoothed loss before its minimum (past the
    # minimum the loss may fall again only because training has already blown up).
    end = losses.index(best)
    slopes = [(losses[i + 1] - losses[i]) / (math.log(lrs[i + 1]) - math.log(lrs[i])) for i in range(end)]
    steepest = min(range(len(slopes)), key=slopes.__getitem__) if slopes else 0
    return {"lrs": lrs, "losses": losses, "suggested_lr": lrs[steepest], "min_loss_lr": lrs[losses.index(best)]}


def geometry(params: dict, seed: int, num_classes: int = 10, batch: int = 8) -> dict:
    """Stage map sides and the fraction of input pixels reaching the logits, for the run's model at init.

    Needs no data: the input is noise at the run's crop size. Batch-norm runs in eval mode (its
    statistics would otherwise couple every pixel to every output, a path no feature uses); the
    reach is the union over the batch of pixels with a non-zero input gradient.
    """
    torch.manual_seed(seed)
    model = build_model(params["model"], num_classes).eval()
    res = params["loader"]["res"]
    images = torch.randn(batch, 3, res, res, requires_grad=True)
    sides: dict[str, int] = {}
    hooks = [getattr(model, name).register_forward_hook(
        lambda _m, _i, out, name=name: sides.__setitem__(name, out.shape[-1]))
        for name in ("stem", "layer1", "layer2", "layer3", "layer4") if hasattr(model, name)]
    model(images).sum().backward()
    for hook in hooks:
        hook.remove()
    reached = images.grad.abs().amax(dim=(0, 1)) > 0
    return {"res": res, "stage_sides": sides, "input_reach": reached.float().mean().item()}


def plot_lr_range(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lrs"], result["losses"])
    ax.axvline(result["suggested_lr"], color="r", linestyle="--", label=f"suggested {result['suggested_lr']:.3g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="smoothed train loss", title="LR range test")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("check", choices=["overfit", "lr-range", "geometry"])
    parser.add_argument("--run", default="baseline", help="the run whose model and optimizer to check")
    parser.add_argument("--seed", type=int, default=0)
    params_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    return run_main("sanity", lambda: _check(args))


def _check(args: argparse.Namespace) -> int:
    params = params_mod.resolve_run(params_mod.from_args(args), args.run)
    if args.check == "geometry":
        print(json.dumps({"run": args.run, **geometry(params, args.seed)}))
        return 0
    if args.check == "overfit":
        ok, losses = overfit(params, args.seed)
        verdict = "reached" if ok else "did NOT reach"
        print(json.dumps({"run": args.run, "steps": len(losses), "first_loss": losses[0], "last_loss": losses[-1],
                          "target": params["sanity"]["overfit_loss"], "passed": ok}))
        print(f"overfit one batch: {verdict} loss {params['sanity']['overfit_loss']} in {len(losses)} steps",
              file=sys.stderr)
        return 0 if ok else 1
    result = lr_range(params, args.seed)
    out = Path(params["paths"]["reports"]) / "sanity" / f"lr_range_{args.run}"
    plot_lr_range(result, out.with_suffix(".png"))
    write_json(out.with_suffix(".json"), result)
    tags = {"check": "lr-range", "profile": params["profile"]["name"]}
    with tracking.start_run(params, f"sanity-lr-range/{args.run}", args.seed, tags, resume=False) as tracker:
        tracker.log_metrics({"suggested_lr": result["suggested_lr"], "min_loss_lr": result["min_loss_lr"]}, step=0)
        tracker.log_artifact(out.with_suffix(".png"))
        tracker.log_artifact(out.with_suffix(".json"))
    print(json.dumps({"run": args.run, "suggested_lr": result["suggested_lr"],
                      "min_loss_lr": result["min_loss_lr"], "plot": str(out.with_suffix(".png"))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
