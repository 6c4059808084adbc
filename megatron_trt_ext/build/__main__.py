"""python -m megatron_trt_ext.build EXPORT_DIR [--options JSON]: build one export's engines."""

import argparse
import json
import sys

from ..errors import ConfigError
from .options import BuildOptions
from .runner import build_export


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m megatron_trt_ext.build", description=__doc__)
    p.add_argument("export_dir")
    p.add_argument("--options", help="BuildOptions as JSON (default: the export's recipe)")
    args = p.parse_args(argv)
    try:
        options = BuildOptions.from_dict(json.loads(args.options), "--options") if args.options else None
        record = build_export(args.export_dir, options)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    return 0 if record["status"] in ("complete", "skipped", "no_tensorrt_backend") else 1


if __name__ == "__main__":
    raise SystemExit(main())
