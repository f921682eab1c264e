"""``python -m robuq.cli …`` (how torchrun starts robuq: ``torchrun … -m robuq.cli qat …``)."""

import sys

from robuq.cli.main import main

sys.exit(main())
