"""``python -m gateway.cli``: the ``ai-sysadmin`` command."""

import sys

from gateway.cli import main

sys.exit(main())
