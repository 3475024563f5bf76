"""``python -m gpu_fleet_binder``: run the binder against any NATS URL."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from gpu_fleet.runtime import logs
from gpu_fleet_binder.service import Binder, BinderConfig


def main(argv: list[str] | None = None) -> int:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="gpu-fleet-binder", description=__doc__)
    p.add_argument("--nats-url", default=env("GPU_FLEET_NATS_URL", "nats://127.0.0.1:4222"))
    p.add_argument("--log-level", default=env("GPU_FLEET_LOG_LEVEL", "info"))
    args = p.parse_args(argv)
    logs.configure("binder", args.log_level)

    async def amain() -> None:
        binder = Binder(BinderConfig(nats_url=args.nats_url))
        binder.install_signal_handlers()
        await binder.run()

    asyncio.run(amain())
    return 0


if __name__ == "__main__":
    sys.exit(main())
