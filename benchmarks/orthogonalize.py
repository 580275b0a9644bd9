"""Newton-Schulz orthogonalisation (``preconditioner="muon"``) by precision: time and accuracy.

Muon's direction orthogonalises each weight matrix's momentum every step; on
large matrices this is the step's main cost. This times
:func:`elra.orthogonal.orthogonalize` on stacks of the benchmark's matrix
shapes in float32, float32 with TF32 matrix products (CUDA only) and
bfloat16, and reports how far each result is from the exact polar factor
``U V^T`` (relative Frobenius error) and from the same iteration in float64.
Newton-Schulz with these coefficients leaves singular values at about
0.7-1.2 (and tiny ones tiny), so the first error is the method's own; the
second is what the precision adds. (ELRA keeps float32: the bfloat16
iteration made its held-out losses worse, see docs/benchmarks.md.)

    python benchmarks/orthogonalize.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.cli import positive  # noqa: E402
from elra.orthogonal import orthogonalize  # noqa: E402

SHAPES = {"MLP 4 x 1536x1536": (4, 1536, 1536), "transformer 48 x 256x64": (48, 256, 64), "transformer 48 x 64x64": (48, 64, 64)}


def timed(fn, device: str, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after two warm-ups."""
    times = []
    for i in range(repeats + 2):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=positive, default=10)
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    modes = [("float32", torch.float32, False), ("bfloat16", torch.bfloat16, False)]  # (label, compute dtype, TF32)
    if args.device == "cuda":
        modes.insert(1, ("float32, TF32", torch.float32, True))
    print(f"{'matrices':<26}{'precision':<16}{'ms':>9}{'vs U V^T':>10}{'vs float64':>12}")
    for name, shape in SHAPES.items():
        momentum = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        u, _, vh = torch.linalg.svd(momentum, full_matrices=False)
        polar, exact = u @ vh, orthogonalize(momentum)
        x = momentum.to(device=args.device, dtype=torch.float32)
        for label, dtype, tf32 in modes:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            ms = timed(lambda: orthogonalize(x, dtype), args.device, args.repeats)
            result = orthogonalize(x, dtype).double().cpu()
            errors = [float((result - ref).norm() / ref.norm()) for ref in (polar, exact)]
            print(f"{name:<26}{label:<16}{ms:>9.2f}{errors[0]:>10.3f}{errors[1]:>12.1e}")
    torch.backends.cuda.matmul.allow_tf32 = False


if __name__ == "__main__":
    main()
