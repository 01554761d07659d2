"""A look inside trained adapters: how much each weight changed, in how many directions, and how two compare.

    python -m lora.anatomy runs/gpt2-lora                    # one adapter: a train.py --out directory or its .pt
    python -m lora.anatomy runs/r4 runs/r8                   # two adapters: also their subspace similarity
    python -m lora.anatomy runs/r4 --base model.safetensors  # the base weights give ||ΔW|| / ||W|| too

For every adapted module, ΔW is the change the adapter makes to the weight: s B A (for DoRA, W' - W, which needs
the base; without it the table shows DoRA's directional part s B A). The table gives
- ||ΔW||, the Frobenius norm, and ||ΔW|| / ||W|| when the base weights are given (`--base`: a safetensors file
  such as the Hub's gpt2 model.safetensors, read with tensorio's reader);
- the singular values σ_1 >= σ_2 >= ... of ΔW: at most r of them are non-zero (2r for a PiSSA adapter);
- rank: how many directions ΔW uses at all, the number of σ_i above RANK_RTOL * σ_1;
- erank: how evenly it uses them, the entropy effective rank exp(-Σ p_i ln p_i), p_i = σ_i / Σσ (Roy and
  Vetterli, 2007): 1 when one direction carries everything, k when k directions carry equal weight.

Two adapters A1 (r1, in) and A2 (r2, in) of one module are compared as in the LoRA paper (Hu et al., 2021,
Section 7, Figure 3): with U^i the top-i right singular vectors of A (its most important input directions),

    φ(A1, A2, i, j) = ||U1^i.T @ U2^j||_F^2 / min(i, j)      in [0, 1]

1 when the smaller subspace lies inside the larger one, 0 when they are orthogonal. The paper found the top
directions of r=8 and r=64 adapters to coincide, and the rest to be mostly noise.

With matplotlib (optional: `pip install matplotlib`) a PNG heatmap shows ||ΔW|| / ||W|| (or ||ΔW||) by layer and
projection. This module reads checkpoints and safetensors files only; it needs no model code.
"""
import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch

from tensorio import FileError, atomic_write, check_writable_dir, load_safetensors

from .checkpoint import load_adapter, recorded_config
from .dora import DoRALinear
from .errors import LoRAError
from .layer import LoRALinear

RANK_RTOL = 1e-2  # a direction counts when its singular value is at least 1% of the largest


def adapted_layers(checkpoint: dict) -> dict[str, LoRALinear]:
    """Rebuild each adapted module of a checkpoint as a layer holding its A, B (and m), weight left empty."""
    config, adapter = recorded_config(checkpoint), checkpoint["adapter"]
    layers = {}
    for key, A in adapter.items():
        if not key.endswith(".lora_A"):
            continue
        name = key.removesuffix(".lora_A")
        B = adapter[f"{name}.lora_B"]
        parts = config.parts(name)
        out_features = B.shape[0] if parts is None else B.shape[0] // sum(parts) * len(parts)
        layer_class = DoRALinear if config.dora else LoRALinear
        layer = layer_class(A.shape[1], out_features, config.rank, config.alpha, bias=False,
                            rank_stabilized=config.rank_stabilized, parts=parts)
        layer.load_state_dict({k.removeprefix(f"{name}."): v for k, v in adapter.items() if k.startswith(f"{name}.")},
                              strict=False)
        layers[name] = layer
    return layers


def base_weights(path: str | os.PathLike, layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """Each adapted module's base weight as (out, in). The Hub's GPT-2 file has no `transformer.` prefix and stores
    its projections (in, out) ("Conv1D"); a square one is transposed when the file's other ones were."""
    def key(name):
        return f"{name}.weight"

    wanted = {key(n) for n in layers} | {key(n).removeprefix("transformer.") for n in layers}
    found = load_safetensors(path, wanted)
    weights = {n: found.get(key(n), found.get(key(n).removeprefix("transformer."))) for n in layers}
    missing = [n for n, w in weights.items() if w is None]
    if missing:
        raise ValueError(f"{path} has no weight for {len(missing)} adapted modules, e.g. {missing[0]}: give the "
                         f"base model the adapter was trained on")
    shapes = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}
    transposed = any(w.shape == shapes[n][::-1] and shapes[n][0] != shapes[n][1] for n, w in weights.items())
    weights = {n: (w.T if transposed else w).float() for n, w in weights.items()}
    wrong = [f"{n} {tuple(w.shape)} vs {shapes[n]}" for n, w in weights.items() if w.shape != shapes[n]]
    if wrong:
        raise ValueError(f"{path} is not the adapter's base: {wrong[0]}")
    return weights


@torch.no_grad()
def weight_change(layer: LoRALinear, weight: torch.Tensor | None) -> torch.Tensor:
    """ΔW (out, in): s B A; for DoRA with a base weight, the whole change m / ||W + s B A|| (W + s B A) - W."""
    if isinstance(layer, DoRALinear) and weight is not None:
        layer.weight.copy_(weight)
        layer.merge()
        return layer.weight - weight
    return layer.delta_weight()


def effective_rank(singular_values: torch.Tensor) -> tuple[int, float]:
    """(rank, erank): σ_i above RANK_RTOL * σ_1, and exp of the entropy of σ / Σσ. (0, 0.0) for ΔW = 0."""
    if singular_values[0] == 0:
        return 0, 0.0
    p = singular_values / singular_values.sum()
    p = p[p > 0]
    return int((singular_values > RANK_RTOL * singular_values[0]).sum()), math.exp(-(p * p.log()).sum().item())


def subspace_similarity(A1: torch.Tensor, A2: torch.Tensor) -> torch.Tensor:
    """φ(A1, A2, i, j) for i = 1..r1, j = 1..r2, as an (r1, r2) tensor (LoRA paper, Section 7)."""
    U1 = torch.linalg.svd(A1.double(), full_matrices=False).Vh  # (r1, in): right singular vectors, top first
    U2 = torch.linalg.svd(A2.double(), full_matrices=False).Vh  # (r2, in)
    overlap = (U1 @ U2.T) ** 2  # (r1, r2): squared cosines between directions
    i = torch.arange(1, len(U1) + 1)[:, None]
    j = torch.arange(1, len(U2) + 1)[None, :]
    return overlap.cumsum(0).cumsum(1) / torch.minimum(i, j)  # sum over the top-i x top-j block / min(i, j)


def analyse(checkpoint: dict, base: str | None = None) -> list[dict]:
    """One row per adapted module: name, norm, ratio (None without a base), singular values, rank, erank."""
    layers = adapted_layers(checkpoint)
    weights = base_weights(base, layers) if base else {}
    rows = []
    for name, layer in layers.items():
        weight = weights.get(name)
        delta = weight_change(layer, weight)
        singular_values = torch.linalg.svdvals(delta.double())[:layer.lora_A.shape[0]]  # the rest are rounding
        norm = delta.norm().item()
        rank, erank = effective_rank(singular_values)
        rows.append({"module": name, "norm": norm, "ratio": None if weight is None else norm / weight.norm().item(),
                     "singular_values": singular_values.tolist(), "rank": rank, "erank": erank})
    return rows


def layer_and_projection(module: str) -> tuple[str, str]:
    """`transformer.h.3.attn.c_attn` -> (`transformer.h.3`, `attn.c_attn`): split at the first block number."""
    found = re.search(r"\.(\d+)\.", module)
    return (module[:found.end() - 1], module[found.end():]) if found else (module, "")


def report(rows: list[dict]) -> str:
    """The table, then the modules, layers and projections that changed most."""
    measure = "ratio" if rows[0]["ratio"] is not None else "norm"
    width = max(len(r["module"]) for r in rows)
    lines = [f"{'module':<{width}}  {'||ΔW||':>9}  {'/||W||':>9}  {'rank':>4}  {'erank':>5}  singular values of ΔW"]
    for r in rows:
        ratio = f"{r['ratio']:9.2e}" if r["ratio"] is not None else f"{'-':>9}"
        sv = " ".join(f"{s:.3g}" for s in r["singular_values"])
        lines.append(f"{r['module']:<{width}}  {r['norm']:9.3e}  {ratio}  {r['rank']:4d}  {r['erank']:5.2f}  {sv}")
    label = "||ΔW|| / ||W||" if measure == "ratio" else "||ΔW|| (give --base for ||ΔW|| / ||W||)"
    top = sorted(rows, key=lambda r: -r[measure])[:5]
    lines += ["", f"changed most, by {label}:"] + [f"  {r['module']}  {r[measure]:.3e}" for r in top]
    for title, index in (("layer", 0), ("projection", 1)):
        groups: dict[str, list[float]] = {}
        for r in rows:
            groups.setdefault(layer_and_projection(r["module"])[index], []).append(r[measure])
        means = sorted(((sum(v) / len(v), k) for k, v in groups.items()), reverse=True)
        lines.append(f"by {title} (mean): " + ", ".join(f"{k} {m:.3e}" for m, k in means))
    return "\n".join(lines)


def similarity_report(first: dict, second: dict) -> str:
    """φ per module shared by both adapters, and its mean over modules for every (i, j)."""
    A1 = {k.removesuffix(".lora_A"): v for k, v in first["adapter"].items() if k.endswith(".lora_A")}
    A2 = {k.removesuffix(".lora_A"): v for k, v in second["adapter"].items() if k.endswith(".lora_A")}
    shared = [name for name in A1 if name in A2]
    if not shared:
        return "the two adapters share no adapted module: no subspace similarity"
    phis = {name: subspace_similarity(A1[name], A2[name]) for name in shared}
    r1, r2 = phis[shared[0]].shape
    width = max(len(n) for n in shared)
    lines = ["subspace similarity φ(i, j) of the two adapters' A (LoRA paper, Section 7): 1 = same directions",
             f"{'module':<{width}}  {'φ(1, 1)':>8}  φ({r1}, {r2})"]
    lines += [f"{n:<{width}}  {phi[0, 0]:8.3f}  {phi[-1, -1]:.3f}" for n, phi in phis.items()]
    if all(phi.shape == (r1, r2) for phi in phis.values()):
        mean = torch.stack(list(phis.values())).mean(0)
        lines += ["", f"mean over modules, rows i = 1..{r1}, columns j = 1..{r2}:"]
        lines += ["  " + " ".join(f"{v:.2f}" for v in row.tolist()) for row in mean]
    return "\n".join(lines)


def write_heatmap(runs: list[tuple[str, list[dict]]], path: Path) -> str:
    """A PNG of the measure by layer (rows) and projection (columns), one panel per adapter; returns a message."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no heatmap: matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 6), squeeze=False)
    for ax, (title, rows) in zip(axes[0], runs):
        measure = "ratio" if rows[0]["ratio"] is not None else "norm"
        cells = {layer_and_projection(r["module"]): r[measure] for r in rows}
        layers = list(dict.fromkeys(layer for layer, _ in cells))
        projections = list(dict.fromkeys(projection for _, projection in cells))
        grid = torch.full((len(layers), len(projections)), float("nan"))
        for (layer, projection), value in cells.items():
            grid[layers.index(layer), projections.index(projection)] = value
        image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
        ax.set_xticks(range(len(projections)), projections, rotation=30, ha="right")
        ax.set_yticks(range(len(layers)), layers)
        ax.set_title(f"{title}\n{'||ΔW|| / ||W||' if measure == 'ratio' else '||ΔW||'}", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    try:
        with atomic_write(path) as f:
            fig.savefig(f, format="png", dpi=120)
    finally:
        plt.close(fig)
    return f"heatmap written to {path}"


def checkpoint_path(run: str) -> Path:
    """A train.py --out directory means its checkpoint.pt."""
    path = Path(run)
    return path / "checkpoint.pt" if path.is_dir() else path


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
READERS_FOLDER_FILES = ("model.safetensors", "adapter_config.json")  # a model folder, a PEFT adapter


def is_png(path: Path) -> bool:
    """Whether the file starts with PNG's 8-byte signature (an unreadable file is not one)."""
    try:
        with open(path, "rb") as f:
            return f.read(8) == PNG_SIGNATURE
    except OSError:
        return False


def check_png_output(png: Path, inputs: list[Path], overwrite: bool) -> None:
    """Refuse, before any work, a --png that would spoil something: an input (symlinks resolved), a file that is not
    a PNG, a PNG without --overwrite, a new name in a model folder or a PEFT adapter (their readers load or refuse
    what they find there), or a folder that cannot be written in. A run folder may hold pictures: RUN/anatomy.png."""
    target = png.resolve()
    for path in inputs:
        if target == path.resolve():
            raise LoRAError(f"--png {png} would replace {path}, which this command reads: write elsewhere")
    folder = next(p for p in target.parents if p.exists())
    if not folder.is_dir():
        raise LoRAError(f"--png {png}: {folder} is a file, not a directory")
    if folder == target.parent and any((folder / name).exists() for name in READERS_FOLDER_FILES):
        raise LoRAError(f"--png {png}: {folder} is a model or a PEFT adapter, whose readers load or refuse what is "
                        f"in it: write {target.name} elsewhere")
    if target.is_dir():
        raise LoRAError(f"--png {png} is a directory: name the file to write")
    if target.exists():
        if not is_png(target):
            raise LoRAError(f"--png {png} holds another file, not a PNG picture: this command replaces only what it "
                            f"writes itself; choose another --png")
        if not overwrite:
            raise LoRAError(f"{png} already exists (a PNG picture): pass --overwrite to replace it, or another --png")
    check_writable_dir(folder, "--png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lora.anatomy", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="a train.py --out directory or its checkpoint.pt "
                        "(two: also compare them)")
    parser.add_argument("--base", help="the base model's safetensors file, for ||ΔW|| / ||W||")
    parser.add_argument("--png", help="where to write the heatmap (default: anatomy.png beside the first RUN's "
                        "checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace a PNG already at --png")
    args = parser.parse_args(argv)
    if len(args.runs) > 2:
        parser.error("give one RUN, or two to compare")
    if args.base and not os.path.isfile(args.base):
        parser.error(f"no file at --base {args.base}: give the base model's model.safetensors")
    paths = [checkpoint_path(run) for run in args.runs]
    png = Path(args.png) if args.png else paths[0].parent / "anatomy.png"
    inputs = [Path(run) for run in args.runs] + paths + ([Path(args.base)] if args.base else [])
    check_png_output(png, inputs, args.overwrite)
    checkpoints = [load_adapter(path) for path in paths]
    analysed = []
    for run, checkpoint in zip(args.runs, checkpoints):
        try:
            rows = analyse(checkpoint, args.base)
        except ValueError as e:
            parser.error(str(e))
        config = checkpoint["lora_config"]
        print(f"{run}: rank {config['rank']}, alpha {config['alpha']}, "
              f"{'DoRA, ' if config.get('dora') else ''}{len(rows)} adapted modules\n{report(rows)}\n")
        analysed.append((run, rows))
    if len(checkpoints) == 2:
        print(similarity_report(*checkpoints) + "\n")
    print(write_heatmap(analysed, png))  # atomic: a full disk leaves the file there before untouched (FileError)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (LoRAError, FileError) as e:  # the input needs changing: one line, not a traceback (as the scripts do)
        sys.exit(f"error: {e}")
