"""``python -m nnhandler``: the ``nnhandler`` command (:mod:`nnhandler.cli`)."""

import sys

from .cli import main

sys.exit(main())
