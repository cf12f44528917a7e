"""Prints what JAX sees on this host and fails unless the devices are of the wanted platform.

On a TPU pod slice run it on every worker at once (`launch/tpu.sh setup` and `check` do):
it calls jax.distributed.initialize(), which on Cloud TPU finds the other workers itself, so
the device count printed is that of the whole slice.

    python3 launch/check_devices.py                    # expects TPU devices
    python3 launch/check_devices.py --platform=cpu --no_distributed
"""
import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platform", default="tpu", help="the platform the devices must be on")
    parser.add_argument("--no_distributed", action="store_true",
                        help="do not call jax.distributed.initialize() first")
    args = parser.parse_args(argv)

    import jax

    if not args.no_distributed:
        try:
            jax.distributed.initialize()
        except Exception as e:  # a single host with no cluster to find: carry on alone
            print(f"jax.distributed.initialize() skipped: {e}", flush=True)
    local = jax.local_devices()
    platform = local[0].platform if local else "none"
    print(f"process {jax.process_index()} of {jax.process_count()}: {len(local)} local "
          f"{platform} devices, jax.device_count()={jax.device_count()}, jax {jax.__version__}",
          flush=True)
    if platform != args.platform:
        print(f"error: expected {args.platform} devices, found {platform}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
