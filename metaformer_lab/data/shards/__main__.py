"""`python -m metaformer_lab.data.shards SRC DEST [--max-side N]`: see conversion.py."""

import sys

from metaformer_lab.data.shards.conversion import main

sys.exit(main())
