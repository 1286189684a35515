"""``python -m actors.cli``: the same as the ``kizuna-stream`` script."""

import sys

from actors.cli.main import main

sys.exit(main())
