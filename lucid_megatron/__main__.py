import sys

from lucid_megatron.cli import main

# Guarded: checkpoint writers and DataLoader workers start *spawned* processes that re-import the
# main module; an unguarded call here would start a second training run inside them.
if __name__ == "__main__":
    sys.exit(main())
