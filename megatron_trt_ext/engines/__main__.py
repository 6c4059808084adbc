"""python -m megatron_trt_ext.engines EXPORT_DIR [--options JSON]: build one export's engines
(what a training run launches after each export; `megatron-trt-ext build` is the user-facing CLI)."""

import argparse
import json

from ..cli import run_build
from ..errors import ConfigError
from .options import BuildOptions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_trt_ext.engines", description=__doc__)
    p.add_argument("export_dir")
    p.add_argument("--options", help="BuildOptions as JSON (default: the export's recipe)")
    args = p.parse_args(argv)
    try:
        options = BuildOptions.from_dict(json.loads(args.options), "--options") if args.options else None
    except ConfigError as exc:
        return run_build(None, None, error=str(exc))
    return run_build(args.export_dir, options)


if __name__ == "__main__":
    raise SystemExit(main())
