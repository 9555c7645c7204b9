"""``python -m sketchtune_jax.cli``: the ``sketchtune`` command."""

import sys

from sketchtune_jax.cli import main

sys.exit(main())
