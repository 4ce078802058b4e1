"""`python -m runner.core PLAN --exp-dir DIR`: same as `infra-train`."""

import sys

from runner.core.cli import main

sys.exit(main())
