"""Ray job entrypoint: prepare the dataset and train every pending block of a config's model families.

    ray job submit --address http://127.0.0.1:8265 -- python jobs/train.py configs/digits.yaml --set store=s3://b/p

`ray job submit` sets RAY_ADDRESS for this driver, and pipeline.execution.init_ray joins that cluster.
Exit codes: 0 ok, 2 bad input (config, data, forget sets, store), 1 any other failure.
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", metavar="CONFIG", help="YAML config file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.epochs=3 (repeatable)")
    parser.add_argument("--family", action="append", choices=("full", "subset", "oracle"),
                        help="train only these families (repeatable; default all)")
    parser.add_argument("--data-root", default=None, help="local folder holding the dataset (cifar10)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.config import ConfigError, load_config
    from pipeline.data.datasets import DataError
    from pipeline.data.forget_sets import ForgetSetError
    from pipeline.plan import Plan, StageError
    from pipeline.stages.prepare import run_prepare
    from pipeline.stages.train import run_train
    from pipeline.store import Store, StoreError

    start = time.perf_counter()
    try:
        cfg = load_config(args.config, args.overrides)
        plan = Plan(cfg, Store(cfg.store), args.data_root)
        print(f"config {cfg.name}: store {plan.store.root}", flush=True)
        meta = run_prepare(plan)
        print(f"prepare {plan.prepare.id}: {meta['n_train']} train, {meta['n_val']} val", flush=True)
        out = run_train(plan, tuple(args.family or ("full", "subset", "oracle")))
    except (ConfigError, DataError, ForgetSetError, StageError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    except Exception as exc:  # noqa: BLE001 - report and fail the job
        print(f"failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    print(f"train: {out['trained']} models trained in {time.perf_counter() - start:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
