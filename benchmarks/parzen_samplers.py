"""The Parzen-window log-likelihood of MNIST test images (the paper's Table 2 protocol, `thermodiff
parzen`) from the samples of each sampler at equal network calls, on one trained run:

    OMP_NUM_THREADS=1 python benchmarks/parzen_samplers.py RUN [--samples 1000] [--steps 20]
                                                          [--samplers ancestral,ddim,dpm2m] [--precision P]

A sampler may name the respaced chain's variances after a colon (``ancestral:fitted``, `thermodiff
parzen --variance`): the same seeds' draws on the same steps, with other reverse variances; and its
steps after an at sign (``ancestral:fitted@optimal20``, `thermodiff parzen --steps`), else --steps;
``+clip`` before them clips the network's x_0 to the data's range (``ancestral:fitted+clip``,
`thermodiff parzen --clip-x0`).

Each sampler draws --samples images on the run's chain respaced to --steps steps (one network call
a step for these three), and `thermodiff parzen` scores every test image under a Gaussian window
on them, its bandwidth validated on the last 10000 training images. The samples are kept in the
run as they are drawn (RUN/parzen_samples), so a rerun reuses them. Fewer samples than the
protocol's 10000 give a lower figure (the window fits fewer points), the same for every sampler:
the comparison is between samplers. The network samples in fp32, or in --precision (fp32 or
bf16, as `thermodiff parzen --precision`). Writes benchmarks/results/parzen_samplers_NAME.json (NAME
the run's experiment; parzen_samplers_NAME_bf16.json with --precision bf16, ..._stepsN.json with
--steps N other than 20).
"""

import argparse
import time

import torch

from record import thermodiff_json, write_result  # a sibling module: benchmarks/ is on sys.path when run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--samplers", default="ancestral,ddim,dpm2m",
                        help="comma-separated SAMPLER[:VARIANCE][+clip][@STEPS] (see above)")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--name", help="the record's name (default parzen_samplers_NAME..., see above)")
    args = parser.parse_args()
    results, start = {}, time.perf_counter()
    for spec in args.samplers.split(","):
        chain, _, steps = spec.partition("@")
        sampler_and_variance, _, clip = chain.partition("+")
        sampler, _, variance = sampler_and_variance.partition(":")
        if clip not in ("", "clip"):
            parser.error(f"--samplers {spec}: the only option after '+' is clip")
        results[spec] = thermodiff_json(["parzen", args.run, "--samples", str(args.samples), "--steps", steps or str(args.steps),
                                         "--sampler", sampler, "--precision", args.precision,
                                         *(["--variance", variance] if variance else []),
                                         *(["--clip-x0"] if clip else [])])
    experiment = next(iter(results.values()))["experiment"]
    record = {"run": args.run, "experiment": experiment, "samples": args.samples, "steps": args.steps,
              "network_calls_per_sample": {spec: r["sampling_steps"] for spec, r in results.items()},
              "command": f"OMP_NUM_THREADS={torch.get_num_threads()} python benchmarks/parzen_samplers.py {args.run} "
                         f"--samples {args.samples} --steps {args.steps} --samplers {args.samplers} --precision {args.precision}"
                         + (f" --name {args.name}" if args.name else ""),
              "wall_s": time.perf_counter() - start, "samplers": results}
    suffix = "" if args.precision == "fp32" else f"_{args.precision}"
    suffix += "" if args.steps == 20 else f"_steps{args.steps}"
    print(write_result(args.name or f"parzen_samplers_{experiment.removesuffix('_unet')}{suffix}", record))


if __name__ == "__main__":
    main()
