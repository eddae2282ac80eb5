"""The Parzen-window estimate's ceiling on MNIST: the protocol of `thermodiff parzen` with
held-out *real* images in place of a model's samples.

    python benchmarks/parzen_real.py --data-dir DIR [--samples 10000]

The "samples" are the first N official training images, the bandwidth is chosen on the last
10000 training images (disjoint from them when N <= 50000) and the figure is the mean
log-likelihood of all 10000 test images: what a model whose samples were as good as the data
would score (Theis et al. 2016, Table 1, report 243 nats for the "true distribution"). Writes
benchmarks/results/parzen_real_mnist.json.
"""

import argparse
import time

from record import write_result  # a sibling module: benchmarks/ is on sys.path when run
from thermodiff.data.images.official import load_mnist
from thermodiff.tasks.parzen import parzen_score, unit_pixels

VALID = 10000


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="a folder with the four official MNIST files")
    parser.add_argument("--samples", type=int, default=10000, help="training images standing in for samples")
    args = parser.parse_args()
    train, _ = load_mnist(args.data_dir, "train")
    test, _ = load_mnist(args.data_dir, "test")
    if not 1 <= args.samples <= len(train) - VALID:
        raise SystemExit(f"--samples must lie in 1..{len(train) - VALID} (disjoint from the validation images)")
    start = time.perf_counter()
    score = parzen_score(unit_pixels(train[:args.samples]), unit_pixels(train[-VALID:]), unit_pixels(test))
    out = write_result("parzen_real_mnist", {
        "command": f"python benchmarks/parzen_real.py --data-dir DIR --samples {args.samples}",
        **score,
        "n_samples": args.samples,
        "n_valid": VALID,
        "n_test": len(test),
        "protocol": (f"`thermodiff parzen`'s estimate with the first {args.samples} MNIST training images as the "
                     f"samples, bandwidth chosen on the last {VALID} training images, mean log-likelihood of the "
                     f"{len(test)} test images, standard error over images"),
        "theis_2016_true_distribution_nats": 243,
        "paper": {"parzen_bits": 317},
        "wall_s": time.perf_counter() - start,
    })
    print(f"{score['parzen_bits']:.1f} +- {score['parzen_stderr_bits']:.1f} bits "
          f"({score['parzen_nats']:.1f} nats), sigma {score['sigma']:.3f} -> {out}")
