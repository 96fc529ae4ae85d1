"""``python -m sfd_fast.cli`` (what torchrun launches): the ``sfd-fast`` command."""

import sys

from .main import main

sys.exit(main())
