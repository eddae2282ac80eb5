"""How long `thermodiff evaluate RUN` takes by default, against the exact sum over every step, on an
image run (T = 1000), and how far the default's unbiased estimate lies from the exact bound.

    python benchmarks/evaluate_speed.py --data-dir DIR [--config mnist] [--steps 20] [--exact-examples 100]

Trains CONFIG for a few steps (the bound's value does not matter, only its cost and the
agreement of the two estimators), then times `thermodiff evaluate RUN` with the config's defaults
(stratified steps per image on the first eval.max_examples test images) and `--t-samples 0` (every
step) on the first EXACT_EXAMPLES test images, from which the time of the exact sum over the whole
test set is extrapolated. Writes benchmarks/results/evaluate_speed_CONFIG.json.
"""

import argparse
import time

from record import thermodiff_json, write_result


def timed(argv: list[str]) -> tuple[dict, float]:
    start = time.perf_counter()
    result = thermodiff_json(argv)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--config", default="mnist")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--exact-examples", type=int, default=100)
    parser.add_argument("--out", default="runs/evaluate_speed")
    args = parser.parse_args()
    trained = thermodiff_json(["train", args.config, "--data-dir", args.data_dir, "--steps", str(args.steps),
                               "--out", args.out, "--overwrite"])
    default, default_s = timed(["evaluate", args.out])
    exact, exact_s = timed(["evaluate", args.out, "--t-samples", "0", "--max-examples", str(args.exact_examples)])
    same, same_s = timed(["evaluate", args.out, "--max-examples", str(args.exact_examples)])
    n_test = default["n_test"]
    record = {
        "command": f"python benchmarks/evaluate_speed.py --data-dir DIR --config {args.config} --steps {args.steps} "
                   f"--exact-examples {args.exact_examples}",
        "train_steps": trained["steps"], "T": default["T"], "n_test": n_test,
        "default": {"estimator": default["estimator"], "n_examples": default["n_examples"], "seconds": round(default_s, 1),
                    "K_bits_per_dim": default["K_bits_per_dim"], "stderr_bits": default["stderr_bits"]},
        "exact_on_subset": {"estimator": exact["estimator"], "n_examples": exact["n_examples"], "seconds": round(exact_s, 1),
                            "K_bits_per_dim": exact["K_bits_per_dim"], "stderr_bits": exact["stderr_bits"]},
        "default_on_the_same_subset": {"n_examples": same["n_examples"], "seconds": round(same_s, 1),
                                       "K_bits_per_dim": same["K_bits_per_dim"], "stderr_bits": same["stderr_bits"]},
        "exact_whole_test_set_minutes_extrapolated": round(exact_s * n_test / exact["n_examples"] / 60, 1),
    }
    write_result(f"evaluate_speed_{args.config}", record)
    print(record)


if __name__ == "__main__":
    main()
