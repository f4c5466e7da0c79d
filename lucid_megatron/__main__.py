import sys

from lucid_megatron.cli import main

sys.exit(main())
