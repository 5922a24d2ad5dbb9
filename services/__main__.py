"""``python -m services``: run a reference service, place orders, count outcomes."""

import sys

from .run import main

sys.exit(main())
