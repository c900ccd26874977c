"""``python -m codeprune`` (and ``accelerate launch -m codeprune recover ...``)."""

import sys

from codeprune.cli import main

sys.exit(main())
